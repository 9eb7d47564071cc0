"""The vLLM loader plugin: ``--load-format weightcache``.

Registered through the ``vllm.general_plugins`` entry point, so it is active in every vLLM
process (API server, engine core, workers). Options come from ``--model-loader-extra-config``:
``{"pipeline": ID, "url": ..., "token": ..., "local_dir": ..., "verify": false, "model": NAME,
"capture": true, "ready_file": PATH, "engine_version": V}`` (``url``/``token`` default to
``WEIGHTCACHE_URL``/``WEIGHTCACHE_TOKEN``; ``model`` picks one model of a multi-model pipeline,
and is required when it has several; ``capture``: replay and upload engine shard sets (true),
neither (false), or only replay ("replay-only"); ``ready_file``: the upload waits until it
exists (the launcher creates it once the engine answers); ``engine_version`` replaces vLLM's
version in capture keys, to test that another version never picks a capture up).

Each worker loads exactly its rank's shard (``tp_size`` = vLLM's tensor-parallel world size) into
the device its model's parameters are on (CUDA, CPU or another backend), straight into those
parameters: the staging ring is the only extra memory (:mod:`loader.param_sink`). A pipeline in
full-tensor mode hands the unsplit tensors to ``model.load_weights`` one batch at a time, so
vLLM's own weight loaders slice them and the whole model is never held twice. Each rank prints
one line: its bytes, seconds and GB/s. vLLM is imported only inside these functions: the rest of
weightcache never needs it.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import torch

LOAD_FORMAT = "weightcache"
_KNOWN_KEYS = frozenset({
    "pipeline", "url", "token", "local_dir", "verify", "model",
    "capture", "ready_file", "engine_version",
})

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
    if config.get("capture", True) not in (True, False, "replay-only"):
        raise ValueError(
            '"capture" in the weightcache extra config must be true, false or "replay-only"'
        )
    for name in ("ready_file", "engine_version"):
        if name in config and (not isinstance(config[name], str) or not config[name]):
            raise ValueError(f'"{name}" in the weightcache extra config must be a string')
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
    with rank_failures(rank, tp_size):
        started = time.perf_counter()
        with open_rank_session(options, tp_size=tp_size, rank=rank,
                               device=_device_of(model)) as session:
            mode = fill_from_manifest(model, session, options, quantized=quantized)
        return finish_report(session, options, mode=mode, started=started)


@contextlib.contextmanager
def rank_failures(rank: int, tp_size: int) -> Iterator[None]:
    """Say a rank's failed load on stderr and in the log (with its code), then re-raise."""
    try:
        yield
    except Exception as exc:
        code = getattr(exc, "code", None) or type(exc).__name__
        line = f"weightcache: rank {rank}/{tp_size} load failed: {code}: {exc}"
        print(line, file=sys.stderr, flush=True)
        log.error(line)
        raise


def _device_of(model: torch.nn.Module) -> torch.device:
    from loader.devices import model_device

    return model_device(model)


def open_rank_session(
    options: dict[str, Any], *, tp_size: int, rank: int, device: torch.device
) -> Any:
    """The rank's leased session (manifest and byte source) from the loader's options."""
    from loader.session import RankSession

    local_dir = options.get("local_dir")
    return RankSession(
        options["pipeline"],
        tp_size=tp_size,
        rank=rank,
        device=device,
        url=options.get("url"),
        token=options.get("token"),
        local_dir=Path(local_dir) if local_dir else None,
    )


def fill_from_manifest(
    model: torch.nn.Module, session: Any, options: dict[str, Any], *, quantized: bool
) -> str:
    """Fill ``model`` from the session's manifest (the rank shard, or full tensors through
    ``model.load_weights``); returns how, in words."""
    from loader.devices import model_device
    from loader.manifest_stream import iter_tensors, stream_into, tensor_keys
    from loader.vllm_weights import (
        check_all_filled,
        check_layout,
        model_parameters,
        plan_destinations,
    )

    device = model_device(model)
    verify = bool(options.get("verify", False))
    manifest = session.manifest
    chosen = select_model(manifest, options.get("model"))
    keys = tensor_keys(manifest)
    names = {keys[i]: manifest.tensors[i].name for i in chosen}
    if manifest.mode == "full":

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
        return "full tensors through model.load_weights"
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
        log.info("rank %d skipped %s (vLLM does not load them)", session.rank, skipped)
    return "rank shard straight into the parameters"


def finish_report(
    session: Any,
    options: dict[str, Any],
    *,
    mode: str,
    started: float,
    capture: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The rank's report: sent to the node's cold-start history and said in one line."""
    from clients.load_cli import report_to_node

    report: dict[str, Any] = session.report.as_dict()
    report.update(mode=mode, seconds=time.perf_counter() - started)
    if capture is not None:
        report["capture"] = capture
    report_to_node(session.url, session.token, options["pipeline"], report,
                   local=bool(options.get("local_dir")))
    delivered = int(report["bytes_delivered"])
    line = (
        f"weightcache: rank {session.rank}/{session.tp_size} weights {delivered / 1e6:.1f} MB "
        f"in {report['seconds']:.2f} s ({report['gb_per_s']:.2f} GB/s, {mode}, "
        f"{session.report.device})"
    )
    print(line, file=sys.stderr, flush=True)
    log.info(line)
    return report


def _loader_class() -> type:
    from vllm.model_executor.model_loader import BaseModelLoader

    class WeightcacheModelLoader(BaseModelLoader):  # type: ignore[misc]
        """Streams this rank's weights from the regional cache into its parameters, or replays
        the engine shard set a previous start of the same key uploaded."""

        def __init__(self, load_config: Any) -> None:
            super().__init__(load_config)
            self.options = parse_extra_config(load_config.model_loader_extra_config)

        def download_model(self, model_config: Any) -> None:
            """Nothing to download: the cache node holds the weights."""

        def load_weights(self, model: Any, model_config: Any) -> None:
            """Fill an already built model (vLLM's in-place reload path): no captures."""
            from vllm.distributed import (
                get_tensor_model_parallel_rank,
                get_tensor_model_parallel_world_size,
            )

            load_rank_into(
                model,
                self.options,
                tp_size=get_tensor_model_parallel_world_size(),
                rank=get_tensor_model_parallel_rank(),
                quantized=getattr(model_config, "quantization", None) is not None,
            )

        def load_model(self, vllm_config: Any, model_config: Any, prefix: str = "") -> Any:
            """vLLM's ``load_model`` (build, fill, post-process) with engine shard sets."""
            from vllm.utils.torch_utils import set_default_torch_dtype

            from loader.engine_load import load_engine_model

            engine = _VllmEngine(self, vllm_config, model_config, prefix)
            with set_default_torch_dtype(model_config.dtype):
                model = load_engine_model(engine, self.options)
            return model.eval()

    return WeightcacheModelLoader


class _VllmEngine:
    """vLLM as ``loader.engine_load.Engine`` sees it: the model's construction and
    post-processing as vLLM's ``BaseModelLoader.load_model`` runs them, and the facts of a
    capture key."""

    def __init__(self, loader: Any, vllm_config: Any, model_config: Any, prefix: str) -> None:
        import vllm
        from vllm.distributed import (
            get_pp_group,
            get_tensor_model_parallel_rank,
            get_tensor_model_parallel_world_size,
        )

        from loader.captures import weights_settings
        from loader.engine_load import EngineFacts

        self.loader = loader
        self.vllm_config = vllm_config
        self.model_config = model_config
        self.prefix = prefix
        load_device = vllm_config.load_config.device or vllm_config.device_config.device
        self.target = torch.device(load_device)
        pp = get_pp_group()
        quantization = getattr(model_config, "quantization", None)
        self.facts = EngineFacts(
            engine="vllm",
            engine_version=str(vllm.__version__),
            tp_size=get_tensor_model_parallel_world_size(),
            rank=get_tensor_model_parallel_rank(),
            pp_size=pp.world_size,
            pp_rank=pp.rank_in_group,
            dtype=str(model_config.dtype).removeprefix("torch."),
            quantization=str(quantization) if quantization else None,
            settings=weights_settings(
                model_config.hf_config.to_dict(),
                max_model_len=model_config.max_model_len,
                enable_expert_parallel=getattr(vllm_config.parallel_config,
                                               "enable_expert_parallel", False),
                kv_cache_dtype=getattr(vllm_config.cache_config, "cache_dtype", None),
            ),
        )

    def create_model(self) -> torch.nn.Module:
        with self.target:
            model: torch.nn.Module = self.loader.create_model(
                vllm_config=self.vllm_config, model_config=self.model_config, prefix=self.prefix
            )
        return model

    def post_process(self, model: torch.nn.Module, *, already_processed: bool) -> None:
        import gc

        from vllm.model_executor.model_loader.reload import finalize_layerwise_processing
        from vllm.model_executor.model_loader.utils import process_weights_after_loading
        from vllm.model_executor.utils import weights_already_processed

        gc.collect()
        torch.accelerator.empty_cache()
        if already_processed:
            # vLLM's contract for weights in runtime format (its ipc_cache uses it too):
            # quantisation methods skip their transforms and rebuild only what is not a tensor
            with weights_already_processed():
                process_weights_after_loading(model, self.model_config, self.target)
        else:
            if any(getattr(getattr(m, "quant_method", None), "uses_meta_device", False)
                   for m in model.modules()):
                finalize_layerwise_processing(model, self.model_config)
            process_weights_after_loading(model, self.model_config, self.target)
        gc.collect()
        torch.accelerator.empty_cache()

    def processed_blocker(self, model: torch.nn.Module) -> str | None:
        from vllm.model_executor.layers.quantization.base_config import QuantizeMethodBase

        quant_methods = [getattr(m, "quant_method", None) for m in model.modules()]
        methods = {type(q).__name__ for q in quant_methods
                   if isinstance(q, QuantizeMethodBase) and not q.supports_pre_processed_weights}
        if any(getattr(q, "uses_meta_device", False) for q in quant_methods):
            methods.add("online quantisation")
        if methods:
            return f"{', '.join(sorted(methods))} cannot take post-processed weights back"
        return None
