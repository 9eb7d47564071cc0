"""Engine shard sets on the replica side: a rank's final tensors out, and back in.

A **capture** is one rank's parameters (and buffers) as the engine holds them, by the engine's
own names, in one safetensors file whose metadata says its stage (``processed``: after the
engine's post-processing; ``loaded``: as its weight loaders left them). This module builds that
file without copying the tensors (:class:`CapturePayload`), talks to the node's capture
endpoints (:class:`CaptureClient`), says why a key found no capture (:func:`explain_miss`),
and plans a replay: every tensor of the capture must land in a tensor of the model of exactly
its name, shape and dtype, checked before a byte is read (:func:`plan_replay`, which raises
:class:`CaptureMismatch`). The bytes then stream straight into those tensors, each chunk checked
against the digests the node computed when it took the upload (:func:`replay_capture`).

Pure torch and httpx: the engine-specific parts (what a key holds, when to capture) are the
caller's (``loader.engine_load``).
"""

from __future__ import annotations

import hashlib
import json
import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import torch

from api.schema import (
    CAPTURE_BUFFERS_METADATA,
    CAPTURE_STAGE_METADATA,
    CaptureInfo,
    CaptureKey,
    CaptureList,
    CaptureStage,
    CaptureSummary,
    Manifest,
    ManifestTensor,
    capture_id,
)
from clients.errors import raise_for_status
from loader.errors import CaptureMismatch, LoaderError
from loader.layout import dtype_code
from loader.safetensors_format import encode_header
from loader.sources import Source
from loader.stream import StreamReport

__all__ = [
    "CaptureClient",
    "CaptureMismatch",
    "CapturePayload",
    "capture_tensors",
    "device_kind",
    "explain_miss",
    "plan_replay",
    "replay_capture",
    "weights_settings",
]

_PIECE = 8 << 20


#: Entries of a model config that say where it was read from or by which library, never what
#: the parameters are: a replica staged elsewhere must find the same capture. (Private
#: entries, ``_name_or_path`` and the like, are left out too.)
_CONFIG_NOT_WEIGHTS = frozenset({"name_or_path", "transformers_version"})


def weights_settings(model_config: Mapping[str, Any], **engine: Any) -> str:
    """The ``settings`` of a weights key: a sha256 of the model config as the engine resolved
    it (its overrides included; where it was read from left out) and of the ``engine``
    settings that change the parameters a rank ends with (context length, expert parallelism,
    KV cache dtype). Values that are not JSON count by their ``str``."""
    config = {k: v for k, v in model_config.items()
              if not k.startswith("_") and k not in _CONFIG_NOT_WEIGHTS}
    document = {"model_config": config, "engine": engine}
    canonical = json.dumps(document, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def device_kind(device: torch.device) -> str:
    """What compiled kernels and post-processed layouts depend on: ``cuda-sm90`` (the CUDA
    compute capability), ``rocm-gfx942``, or ``cpu-x86_64-avx512`` (machine and vector ISA)."""
    if device.type == "cuda":
        hip = getattr(torch.version, "hip", None)
        if hip:
            arch = torch.cuda.get_device_properties(device).gcnArchName.split(":")[0]
            return f"rocm-{arch}"
        major, minor = torch.cuda.get_device_capability(device)
        return f"cuda-sm{major}{minor}"
    if device.type == "cpu":
        capability = torch.backends.cpu.get_cpu_capability().lower() or "default"
        return f"cpu-{platform.machine().lower() or 'unknown'}-{capability}"
    return device.type


def capture_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], set[str]]:
    """The model's non-empty parameters and buffers by name (a tied parameter once), detached
    (no copy), and the names that are buffers."""
    tensors = {n: p.detach() for n, p in model.named_parameters() if p.numel()}
    buffers = {n: b.detach() for n, b in model.named_buffers() if b.numel()}
    tensors.update(buffers)
    return tensors, set(buffers)


@dataclass(frozen=True)
class CapturePayload:
    """A capture as the file the node stores: a safetensors header, then each tensor's bytes
    in name order. The tensors are read when the bytes are, never copied whole."""

    header: bytes
    tensors: tuple[tuple[str, torch.Tensor], ...]
    stage: CaptureStage

    @classmethod
    def build(
        cls, tensors: Mapping[str, torch.Tensor], *, stage: CaptureStage,
        buffers: Iterable[str] = (),
    ) -> CapturePayload:
        ordered = tuple(sorted((n, t) for n, t in tensors.items() if t.numel()))
        if not ordered:
            raise LoaderError("a capture needs at least one tensor")
        header, _ = encode_header(
            [(n, dtype_code(t.dtype), tuple(t.shape), t.numel() * t.element_size())
             for n, t in ordered],
            {
                CAPTURE_STAGE_METADATA: stage,
                CAPTURE_BUFFERS_METADATA: json.dumps(sorted(set(buffers) & dict(ordered).keys())),
            },
        )
        return cls(header=header, tensors=ordered, stage=stage)

    @property
    def size(self) -> int:
        return len(self.header) + sum(t.numel() * t.element_size() for _, t in self.tensors)

    def pieces(self, piece_size: int = _PIECE) -> Iterator[bytes]:
        """The file's bytes, ``piece_size`` at a time (a device tensor is copied to the host
        one piece at a time)."""
        yield self.header
        for _, tensor in self.tensors:
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            for start in range(0, flat.numel(), piece_size):
                yield flat[start : start + piece_size].cpu().numpy().tobytes()

    def sha256(self) -> str:
        digest = hashlib.sha256()
        for piece in self.pieces():
            digest.update(piece)
        return digest.hexdigest()


class CaptureClient:
    """The capture endpoints of one pipeline on a node (synchronous)."""

    def __init__(
        self, url: str, pipeline: str, *, token: str | None = None,
        http: httpx.Client | None = None, timeout: float = 60.0,
    ) -> None:
        self.url = url.rstrip("/")
        self.pipeline = pipeline
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._own = http is None
        self.http = http or httpx.Client(timeout=httpx.Timeout(timeout))

    def close(self) -> None:
        if self._own:
            self.http.close()

    def __enter__(self) -> CaptureClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _url(self, suffix: str = "") -> str:
        return f"{self.url}/v1/pipelines/{self.pipeline}/captures{suffix}"

    def find(self, key: CaptureKey) -> CaptureInfo | None:
        """The capture made for exactly ``key``; None when the node has none."""
        response = self.http.get(self._url(f"/{capture_id(key)}"), headers=self._headers)
        if response.status_code == 404:
            return None
        raise_for_status(response, context=f"capture of {self.pipeline}")
        return CaptureInfo.model_validate_json(response.content)

    def list(self) -> list[CaptureSummary]:
        response = self.http.get(self._url(), headers=self._headers)
        raise_for_status(response, context=f"captures of {self.pipeline}")
        return CaptureList.model_validate_json(response.content).captures

    def upload(
        self, key: CaptureKey, pieces: Iterable[bytes], *, size: int, sha256: str
    ) -> CaptureInfo:
        """Send a capture's bytes (``size`` of them, hashing to ``sha256``)."""
        params = {**key.model_dump(mode="json", exclude_none=True), "sha256": sha256}
        response = self.http.put(
            self._url(f"/{capture_id(key)}"),
            params=params,
            content=iter(pieces),
            headers={**self._headers, "Content-Length": str(size),
                     "Content-Type": "application/octet-stream"},
        )
        raise_for_status(response, context=f"uploading a capture of {self.pipeline}")
        return CaptureInfo.model_validate_json(response.content)

    def upload_payload(self, key: CaptureKey, payload: CapturePayload) -> CaptureInfo:
        return self.upload(key, payload.pieces(), size=payload.size, sha256=payload.sha256())

    def upload_file(self, key: CaptureKey, path: Path) -> CaptureInfo:
        digest = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(_PIECE):
                digest.update(block)

        def pieces() -> Iterator[bytes]:
            with path.open("rb") as handle:
                while block := handle.read(_PIECE):
                    yield block

        return self.upload(key, pieces(), size=path.stat().st_size, sha256=digest.hexdigest())

    def download(self, info: CaptureInfo, dest: Path) -> None:
        """Write a capture's blob to ``dest``, checked against its sha256 (LoaderError)."""
        digest = hashlib.sha256()
        temp = dest.with_name(f".{dest.name}.partial")
        with self.http.stream(
            "GET", f"{self.url}/v1/blobs/{info.blob.sha256}", headers=self._headers
        ) as response:
            raise_for_status(response, context=f"capture {info.id}")
            with temp.open("wb") as out:
                for data in response.iter_raw(_PIECE):
                    digest.update(data)
                    out.write(data)
        if digest.hexdigest() != info.blob.sha256:
            temp.unlink(missing_ok=True)
            raise LoaderError(f"capture {info.id}: the bytes do not hash to its blob")
        temp.replace(dest)


def explain_miss(key: CaptureKey, captures: Iterable[CaptureSummary]) -> str:
    """Why no capture was found for ``key``: the fields in which the nearest capture of the
    same model and kind differs (or that there is none)."""
    mine = key.model_dump(mode="json", exclude_none=True)
    same = [c for c in captures if c.key.kind == key.kind and c.key.model == key.model]
    if not same:
        return f"no {key.kind} capture of model {key.model!r} on the node yet"

    def differing(capture: CaptureSummary) -> list[str]:
        theirs = capture.key.model_dump(mode="json", exclude_none=True)
        return [f for f in sorted(mine.keys() | theirs.keys()) if mine.get(f) != theirs.get(f)]

    nearest = min(same, key=lambda c: (len(differing(c)), c.id))
    theirs = nearest.key.model_dump(mode="json", exclude_none=True)
    parts = [f"{f} {theirs.get(f)!r} there, {mine.get(f)!r} here" for f in differing(nearest)]
    return (
        f"no capture for this key; the nearest of {len(same)} differs in " + "; ".join(parts)
    )


def plan_replay(info: CaptureInfo, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Where each tensor of ``info`` goes in ``model``: name → the tensor to fill.

    A ``loaded`` capture must name exactly the model's non-empty parameters and buffers, each
    of the same shape and dtype. A ``processed`` one holds what post-processing left: it must
    cover every non-empty tensor of the freshly built model, and a tensor post-processing gave
    another shape or dtype (or added) is registered anew, empty, to be filled. CaptureMismatch
    says what does not fit; nothing is read, and for a ``loaded`` capture nothing is changed.
    """
    present, buffers = capture_tensors(model)
    wanted = {t.name: t for t in info.tensors}
    missing = sorted(present.keys() - wanted.keys())
    if missing:
        raise CaptureMismatch(
            f"capture {info.id[:12]} lacks {len(missing)} tensor(s) of the model: "
            f"{', '.join(missing[:5])}"
        )
    extra = sorted(wanted.keys() - present.keys())
    if extra and info.stage != "processed":
        raise CaptureMismatch(
            f"capture {info.id[:12]} has {len(extra)} tensor(s) the model has not: "
            f"{', '.join(extra[:5])}"
        )
    destinations: dict[str, torch.Tensor] = {}
    unfit: list[str] = []
    for name, tensor in wanted.items():
        dest = present.get(name)
        if dest is not None and (
            dtype_code(dest.dtype) == tensor.dtype
            and list(dest.shape) == tensor.shape
            and dest.is_contiguous()
        ):
            destinations[name] = dest
        elif info.stage == "processed":
            unfit.append(name)
        else:
            shape = list(dest.shape) if dest is not None else None
            raise CaptureMismatch(
                f"capture tensor {name} is {tensor.dtype} {tensor.shape}, the model's is "
                f"{dtype_code(dest.dtype) if dest is not None else '-'} {shape}"
            )
    device = next(iter(present.values())).device if present else torch.device("cpu")
    for name in unfit:  # only after every check: a mismatch above changes nothing
        destinations[name] = _register(model, name, wanted[name], device,
                                       buffer=name in buffers or wanted[name].buffer)
    return destinations


def _register(
    model: torch.nn.Module, name: str, tensor: Any, device: torch.device, *, buffer: bool
) -> torch.Tensor:
    from loader.layout import torch_dtype

    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    empty = torch.empty(tensor.shape, dtype=torch_dtype(tensor.dtype), device=device)
    owner._parameters.pop(leaf, None)
    owner._buffers.pop(leaf, None)
    if buffer:
        owner.register_buffer(leaf, empty)
        return empty
    owner.register_parameter(leaf, torch.nn.Parameter(empty, requires_grad=False))
    return empty


def replay_capture(
    info: CaptureInfo,
    destinations: Mapping[str, torch.Tensor],
    *,
    source: Source,
    device: torch.device,
    pipeline: str,
    model: str,
) -> StreamReport:
    """Stream a capture's tensors straight into ``destinations`` (from :func:`plan_replay`),
    every chunk checked against the capture's digests first (IntegrityError, SourceError)."""
    from loader.manifest_stream import stream_into

    manifest = Manifest(
        pipeline=pipeline,
        tp_size=info.key.tp_size,
        rank=info.key.rank or 0,
        bytes_total=info.blob.size,
        files=[],
        tensors=[
            ManifestTensor(model=model, name=t.name, dtype=t.dtype, shape=t.shape,
                           blob=info.blob.sha256, offset=t.offset, length=t.length)
            for t in info.tensors
        ],
        blobs=[info.blob],
        mode="sharded",
    )
    return stream_into(manifest, destinations, source=source, device=device, verify=True)
