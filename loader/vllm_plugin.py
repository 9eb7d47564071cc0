"""The vLLM loader plugin: ``--load-format weightcache``.

Registered through the ``vllm.general_plugins`` entry point, so it is active in every vLLM
process (API server, engine core, workers). Options come from ``--model-loader-extra-config``:
``{"pipeline": ID, "url": ..., "token": ..., "local_dir": ..., "verify": false, "model": NAME}``
(``url``/``token`` default to ``WEIGHTCACHE_URL``/``WEIGHTCACHE_TOKEN``; ``model`` picks one model
of a multi-model pipeline).

Each worker loads exactly its rank's shard (``tp_size`` = vLLM's tensor-parallel world size) into
its own GPU and copies the slices into the model's parameters; a pipeline in full-tensor mode
hands the unsplit tensors to ``model.load_weights`` so vLLM's own weight loaders slice them.
vLLM is imported only inside these functions: the rest of weightcache never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

LOAD_FORMAT = "weightcache"
_KNOWN_KEYS = frozenset({"pipeline", "url", "token", "local_dir", "verify", "model"})


def parse_extra_config(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the loader's options; ValueError naming any unknown or missing key."""
    config = dict(raw or {})
    unknown = set(config) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown weightcache loader options: {sorted(unknown)}")
    if not isinstance(config.get("pipeline"), str) or not config["pipeline"]:
        raise ValueError('the weightcache loader needs {"pipeline": ID} in its extra config')
    return config


def register() -> None:
    """The ``vllm.general_plugins`` entry point; re-entrant, as vLLM requires."""
    from vllm.model_executor import model_loader

    registry = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
    if LOAD_FORMAT in registry:
        return
    model_loader.register_model_loader(LOAD_FORMAT)(_loader_class())


def _loader_class() -> type:
    import torch
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )
    from vllm.model_executor.model_loader import BaseModelLoader

    from loader.load import load
    from loader.vllm_weights import check_all_filled, copy_rank_weights, model_parameters

    class WeightcacheModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Streams this rank's weights from the regional cache into its GPU."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = parse_extra_config(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: the cache node holds the weights."""

        def load_weights(self, model: Any, model_config: Any) -> None:
            tp_size = get_tensor_model_parallel_world_size()
            rank = get_tensor_model_parallel_rank()
            local_dir = self.options.get("local_dir")
            result = load(
                self.options["pipeline"],
                tp_size=tp_size,
                rank=rank,
                device=f"cuda:{torch.cuda.current_device()}",
                url=self.options.get("url"),
                token=self.options.get("token"),
                local_dir=Path(local_dir) if local_dir else None,
                verify=bool(self.options.get("verify", False)),
            )
            wanted = self.options.get("model")
            tensors = [
                (name.split("/", 1)[-1], tensor)
                for name, tensor in result.tensors.items()
                if wanted is None or name.startswith(f"{wanted}/") or "/" not in name
            ]
            if result.manifest.mode == "full":
                model.load_weights(iter(tensors))
            else:
                params, aliases = model_parameters(model)
                check_all_filled(model, copy_rank_weights(params, tensors, aliases=aliases))
            torch.cuda.synchronize()

    return WeightcacheModelLoader
