"""The device a model lives on, and waiting for it: CUDA, CPU or any other torch backend.

Nothing here names a backend by string: the target is wherever the model's parameters are, and a
device is synchronised through ``torch.accelerator`` (or the backend's own module) only when it
runs work asynchronously. CPU copies are synchronous, so a CPU device needs no wait.
"""

from __future__ import annotations

import torch

from loader.errors import LoaderError

__all__ = ["model_device", "synchronize"]


def model_device(module: torch.nn.Module) -> torch.device:
    """The one device all of ``module``'s parameters are on; LoaderError when there is none."""
    devices = {p.device for p in module.parameters()}
    if len(devices) != 1:
        found = sorted(str(d) for d in devices) or ["none: the model has no parameters"]
        raise LoaderError(f"cannot pick a target device: parameters are on {', '.join(found)}")
    return devices.pop()


def synchronize(device: torch.device) -> None:
    """Wait until queued work on ``device`` is done (a no-op on the CPU)."""
    if device.type in ("cpu", "meta"):
        return
    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and accelerator.is_available():
        current = accelerator.current_accelerator()
        if current is not None and current.type == device.type:
            accelerator.synchronize(device)
            return
    backend = getattr(torch, device.type, None)
    wait = getattr(backend, "synchronize", None)
    if wait is None:
        raise LoaderError(f"do not know how to wait for device {device}")
    wait(device)
