"""Peak extra memory of each model load, measured inside vLLM's worker processes.

The engine tests put this directory on ``PYTHONPATH`` with ``WEIGHTCACHE_MEMPROBE_OUT`` set, so
Python imports it at start-up in every vLLM process, spawned workers included. When vLLM imports
its ``BaseModelLoader``, every loader's ``load_weights`` call is wrapped, and so is weightcache's
fill (``fill_from_manifest`` as ``loader.engine_load`` calls it: that loader has a
``load_model`` of its own). Around each: the model's parameters are first written (so their own
pages are resident before the measurement starts), the process's peak RSS is reset
(``/proc/self/clear_refs``), and after the load the peak above the start (``VmHWM``) is appended
as one JSON line to the file. That is the memory a loader needs beyond the parameters it fills:
a staging ring, a second copy of the weights, or (vLLM's own loader) the checkpoint pages it
maps.

Only loads are measured; vLLM's CPU post-processing, which repacks the weights for oneDNN
and briefly holds two copies whatever the loader, comes after and is not counted.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import json
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _measure(loader: str, model: Any, fill: Callable[[], Any]) -> Any:
    """Run ``fill`` (a load into ``model``) and record its peak RSS above the start."""
    import torch

    seen: set[int] = set()
    param_bytes = 0
    with torch.no_grad():
        for param in model.parameters():
            if param.data_ptr() in seen:
                continue
            seen.add(param.data_ptr())
            param.zero_()
            param_bytes += param.numel() * param.element_size()
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := VmRSS
    start = _status_kib("VmRSS")
    result = fill()
    peak = _status_kib("VmHWM")
    record = {
        "pid": os.getpid(),
        "loader": loader,
        "param_bytes": param_bytes,
        "extra_bytes": (peak - start) * 1024,
    }
    with open(os.environ["WEIGHTCACHE_MEMPROBE_OUT"], "a") as out:
        out.write(json.dumps(record) + "\n")
    return result


def _wrap_base_loader(module: ModuleType) -> None:
    """vLLM's loaders: ``load_model`` builds the model and calls ``self.load_weights``."""
    cls = module.BaseModelLoader
    load_model = cls.load_model

    def measured_load_model(self: Any, *args: Any, **kwargs: Any) -> Any:
        inner = self.load_weights

        def load_weights(model: Any, model_config: Any) -> Any:
            return _measure(type(self).__name__, model, lambda: inner(model, model_config))

        self.load_weights = load_weights
        try:
            return load_model(self, *args, **kwargs)
        finally:
            del self.load_weights

    cls.load_model = measured_load_model


def _wrap_engine_load(module: ModuleType) -> None:
    """weightcache's loader has a ``load_model`` of its own (engine shard sets): its fill is
    ``fill_from_manifest`` as ``loader.engine_load`` calls it."""
    fill = module.fill_from_manifest

    def measured_fill(model: Any, *args: Any, **kwargs: Any) -> Any:
        return _measure("WeightcacheModelLoader", model, lambda: fill(model, *args, **kwargs))

    setattr(module, "fill_from_manifest", measured_fill)  # noqa: B010 (a module, typed loosely)


_TARGETS: dict[str, Callable[[ModuleType], None]] = {
    "vllm.model_executor.model_loader.base_loader": _wrap_base_loader,
    "loader.engine_load": _wrap_engine_load,
}


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        wrap = _TARGETS.get(name)
        if wrap is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_wrap(module: ModuleType) -> None:
            exec_module(module)
            wrap(module)

        spec.loader.exec_module = exec_and_wrap  # type: ignore[method-assign]
        return spec


if os.environ.get("WEIGHTCACHE_MEMPROBE_OUT"):
    sys.meta_path.insert(0, _Finder())
