"""The vLLM loader plugin: ``--load-format weightcache``.

Registered through the ``vllm.general_plugins`` entry point, so it is active in every vLLM
process (API server, engine core, workers). Options come from ``--model-loader-extra-config``:
``{"pipeline": ID, "url": ..., "token": ..., "local_dir": ..., "verify": false, "model": NAME}``
(``url``/``token`` default to ``WEIGHTCACHE_URL``/``WEIGHTCACHE_TOKEN``; ``model`` picks one model
of a multi-model pipeline, and is required when it has several).

Each worker loads exactly its rank's shard (``tp_size`` = vLLM's tensor-parallel world size) into
the device its model's parameters are on (CUDA, CPU or another backend), straight into those
parameters: the staging ring is the only extra memory (:mod:`loader.param_sink`). A pipeline in
full-tensor mode hands the unsplit tensors to ``model.load_weights`` one batch at a time, so
vLLM's own weight loaders slice them and the whole model is never held twice. Each rank prints
one line: its bytes, seconds and GB/s. vLLM is imported only inside these functions: the rest of
weightcache never needs it.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

LOAD_FORMAT = "weightcache"
_KNOWN_KEYS = frozenset({"pipeline", "url", "token", "local_dir", "verify", "model"})

log = logging.getLogger("weightcache.loader")


def parse_extra_config(raw: dict[str, Any] | None) -> dict[str, Any]:
    """Validate the loader's options; ValueError naming any unknown or missing key."""
    config = dict(raw or {})
    unknown = set(config) - _KNOWN_KEYS
    if unknown:
        raise ValueError(f"unknown weightcache loader options: {sorted(unknown)}")
    if not isinstance(config.get("pipeline"), str) or not config["pipeline"]:
        raise ValueError('the weightcache loader needs {"pipeline": ID} in its extra config')
    if "model" in config and (not isinstance(config["model"], str) or not config["model"]):
        raise ValueError('"model" in the weightcache extra config must be a model name')
    return config


def register() -> None:
    """The ``vllm.general_plugins`` entry point; re-entrant, as vLLM requires."""
    from vllm.model_executor import model_loader

    registry = getattr(model_loader, "_LOAD_FORMAT_TO_MODEL_LOADER", {})
    if LOAD_FORMAT in registry:
        return
    model_loader.register_model_loader(LOAD_FORMAT)(_loader_class())


def select_model(manifest: Any, wanted: str | None) -> list[int]:
    """Indices of the manifest tensors of model ``wanted`` (the only model when None)."""
    models = sorted({tensor.model for tensor in manifest.tensors})
    if wanted is None:
        if len(models) > 1:
            raise ValueError(
                f"pipeline {manifest.pipeline!r} has models {models}: name one with "
                '{"model": NAME} in the extra config (weightcache launch --model NAME)'
            )
        return list(range(len(manifest.tensors)))
    if wanted not in models:
        raise ValueError(f"pipeline {manifest.pipeline!r} has no model {wanted!r} (has {models})")
    return [i for i, tensor in enumerate(manifest.tensors) if tensor.model == wanted]


def load_rank_into(
    model: torch.nn.Module,
    options: dict[str, Any],
    *,
    tp_size: int,
    rank: int,
    quantized: bool = False,
) -> dict[str, Any]:
    """Stream this rank's weights into ``model``'s parameters; returns the rank's report.

    Pure torch (vLLM supplies ``tp_size``/``rank``), so it runs on any ``nn.Module`` laid out
    as vLLM lays out its models. The report goes to the node's cold-start history; a failure
    is said on stderr and in the log (with its code) before it propagates.
    """
    try:
        return _load_rank_into(model, options, tp_size=tp_size, rank=rank, quantized=quantized)
    except Exception as exc:
        code = getattr(exc, "code", None) or type(exc).__name__
        line = f"weightcache: rank {rank}/{tp_size} load failed: {code}: {exc}"
        print(line, file=sys.stderr, flush=True)
        log.error(line)
        raise


def _load_rank_into(
    model: torch.nn.Module,
    options: dict[str, Any],
    *,
    tp_size: int,
    rank: int,
    quantized: bool,
) -> dict[str, Any]:
    from clients.load_cli import report_to_node
    from loader.devices import model_device, synchronize
    from loader.manifest_stream import iter_tensors, stream_into, tensor_keys
    from loader.session import RankSession
    from loader.vllm_weights import (
        check_all_filled,
        check_layout,
        model_parameters,
        plan_destinations,
    )

    device = model_device(model)
    local_dir = options.get("local_dir")
    verify = bool(options.get("verify", False))
    started = time.perf_counter()
    with RankSession(
        options["pipeline"],
        tp_size=tp_size,
        rank=rank,
        device=device,
        url=options.get("url"),
        token=options.get("token"),
        local_dir=Path(local_dir) if local_dir else None,
    ) as session:
        manifest = session.manifest
        chosen = select_model(manifest, options.get("model"))
        keys = tensor_keys(manifest)
        names = {keys[i]: manifest.tensors[i].name for i in chosen}
        if manifest.mode == "full":
            mode = "full tensors through model.load_weights"

            def named(stream: Iterator[tuple[str, torch.Tensor]]) -> Iterator[Any]:
                for key, tensor in stream:
                    yield names[key], tensor

            tensors = iter_tensors(
                manifest,
                source=session.source,
                keys=list(names),
                verify=verify,
                report=session.report.stream,
            )
            loaded = cast(Any, model).load_weights(named(tensors))
            if loaded is not None and not quantized:
                # vLLM's DefaultModelLoader runs the same check on unquantized models.
                check_all_filled(model, loaded, vllm_exemptions=True)
        else:
            mode = "rank shard straight into the parameters"
            check_layout(manifest.layout)
            params, aliases = model_parameters(model)
            index_of = {key: i for i, key in enumerate(keys)}
            shapes = [(names[k], tuple(manifest.tensors[index_of[k]].shape)) for k in names]
            destinations, filled, skipped = plan_destinations(params, shapes, aliases=aliases)
            check_all_filled(model, filled)  # before a byte is read
            by_name = {d.name: d.view for d in destinations}
            session.report.stream = stream_into(
                manifest,
                {key: by_name[name] for key, name in names.items() if name in by_name},
                source=session.source,
                device=device,
                keys=keys,
                verify=verify,
            )
            if skipped:
                log.info("rank %d skipped %s (vLLM does not load them)", rank, skipped)
        synchronize(device)
    report = session.report.as_dict()
    report.update(mode=mode, seconds=time.perf_counter() - started)
    report_to_node(session.url, session.token, options["pipeline"], report, local=bool(local_dir))
    delivered = int(report["bytes_delivered"])
    line = (
        f"weightcache: rank {rank}/{tp_size} weights {delivered / 1e6:.1f} MB in "
        f"{report['seconds']:.2f} s ({report['gb_per_s']:.2f} GB/s, {mode}, {device})"
    )
    print(line, file=sys.stderr, flush=True)
    log.info(line)
    return report


def _loader_class() -> type:
    from vllm.distributed import (
        get_tensor_model_parallel_rank,
        get_tensor_model_parallel_world_size,
    )
    from vllm.model_executor.model_loader import BaseModelLoader

    class WeightcacheModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Streams this rank's weights from the regional cache into its parameters."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = parse_extra_config(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: the cache node holds the weights."""

        def load_weights(self, model: Any, model_config: Any) -> None:
            load_rank_into(
                model,
                self.options,
                tp_size=get_tensor_model_parallel_world_size(),
                rank=get_tensor_model_parallel_rank(),
                quantized=getattr(model_config, "quantization", None) is not None,
            )

    return WeightcacheModelLoader
