"""A manifest's tensors streamed from a source: into a fresh allocation, into existing tensors,
or a batch at a time.

- :func:`load_manifest`: every tensor into one flat allocation on the device (what ``load()``
  returns: views into it, one ``cudaMalloc``, no fragmentation);
- :func:`stream_into`: straight into tensors that already exist (an engine's parameters), the
  staging ring being the only memory allocated;
- :func:`iter_tensors`: ``(key, tensor)`` on the CPU, a bounded batch at a time.

Tensor keys are the HF tensor names. A pipeline with more than one model (say ASR + LLM) keys
them ``"{model}/{name}"`` instead (:func:`tensor_keys`), so that two models' ``lm_head.weight``
cannot collide; with one model the plain name is kept, which is what an engine's
``load_weights`` expects.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from api.schema import Manifest, ManifestTensor
from loader.errors import LoaderError
from loader.layout import plan_layout, tensor_view
from loader.param_sink import ParamSink, plan_param_stream
from loader.ranges import BlobDigests, ByteRange
from loader.sinks import CpuSink, RingSink, Sink
from loader.sources import Source
from loader.stream import DEFAULT_REQUEST_SIZE, DEFAULT_WORKERS, StreamReport, stream

__all__ = [
    "RING_BUDGET",
    "iter_tensors",
    "load_manifest",
    "manifest_digests",
    "ring_slots",
    "staging_slot_size",
    "stream_into",
    "tensor_keys",
]

#: Staging memory a GPU load may pin (the ring is this big at most, whatever the model size).
RING_BUDGET = 512 << 20


def tensor_keys(manifest: Manifest) -> list[str]:
    """The key of each manifest tensor: its name, or ``model/name`` when several models."""
    models = {tensor.model for tensor in manifest.tensors}
    if len(models) > 1:
        return [f"{tensor.model}/{tensor.name}" for tensor in manifest.tensors]
    return [tensor.name for tensor in manifest.tensors]


def manifest_digests(manifest: Manifest) -> dict[str, BlobDigests]:
    """Each blob's chunk digests, for verifying; LoaderError when a blob has none."""
    known = {
        blob.sha256: BlobDigests(blob.size, blob.chunk_size, tuple(blob.chunk_xxh3_128))
        for blob in manifest.blobs
    }
    missing = {t.blob for t in manifest.tensors} - known.keys()
    if missing:
        raise LoaderError(f"cannot verify: the manifest has no digests for {sorted(missing)}")
    return known


def ring_slots(slot_size: int, workers: int, budget: int = RING_BUDGET) -> int:
    """How many staging slots a ring gets: enough for the readers, within ``budget`` bytes."""
    return max(2, min(workers + 4, budget // slot_size))


def staging_slot_size(
    digests: Mapping[str, BlobDigests] | None, request_size: int, total: int
) -> int:
    """The bytes one staging slot needs: one request, or one whole digest chunk when verifying."""
    if digests is not None:
        slot = max((min(d.chunk_size, d.size) for d in digests.values()), default=1)
    else:
        slot = min(request_size, total)
    return max(slot, 1)


def load_manifest(
    manifest: Manifest,
    *,
    source: Source,
    device: torch.device | str = "cpu",
    verify: bool = False,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
) -> tuple[dict[str, torch.Tensor], StreamReport]:
    """Stream a manifest's tensors from ``source`` into ``device`` (closes ``source``)."""
    try:
        return _load_flat(
            manifest.tensors,
            tensor_keys(manifest),
            manifest_digests(manifest) if verify else None,
            source=source,
            device=torch.device(device),
            workers=workers,
            request_size=request_size,
        )
    finally:
        source.close()


def iter_tensors(
    manifest: Manifest,
    *,
    source: Source,
    keys: Sequence[str] | None = None,
    verify: bool = False,
    batch_bytes: int = 256 << 20,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
    report: StreamReport | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for the manifest's tensors on the CPU, a batch at a time.

    Memory stays bounded by about ``batch_bytes`` (or the largest tensor, when bigger): a batch
    is streamed, its tensors are yielded, and its buffer is dropped before the next one is read,
    so a consumer that copies each tensor away (an engine's ``load_weights``) never holds the
    whole model. ``keys`` selects tensors by key (default: all). ``report`` accumulates bytes
    and time over the batches. The source is not closed.
    """
    all_keys = tensor_keys(manifest)
    wanted = set(keys) if keys is not None else set(all_keys)
    chosen = sorted(
        (i for i, key in enumerate(all_keys) if key in wanted),
        key=lambda i: (manifest.tensors[i].blob, manifest.tensors[i].offset),
    )
    digests = manifest_digests(manifest) if verify else None
    batches: list[list[int]] = []
    size = 0
    for index in chosen:
        length = manifest.tensors[index].length
        if not batches or size + length > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(index)
        size += length
    for batch in batches:
        tensors, part = _load_flat(
            [manifest.tensors[i] for i in batch],
            [all_keys[i] for i in batch],
            digests,
            source=source,
            device=torch.device("cpu"),
            workers=workers,
            request_size=request_size,
        )
        if report is not None:
            report.add(part)
        for index in batch:
            key = all_keys[index]
            yield key, tensors.pop(key)
        del tensors  # the batch's buffer goes once the consumer lets go of its tensors


def stream_into(
    manifest: Manifest,
    destinations: Mapping[str, torch.Tensor],
    *,
    source: Source,
    device: torch.device | str,
    keys: Sequence[str] | None = None,
    verify: bool = False,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
    ring_budget: int = RING_BUDGET,
) -> StreamReport:
    """Stream the manifest's tensors straight into ``destinations`` (key → existing tensor).

    The destinations are the engine's own storage (parameters, or blocks of their rows), all on
    ``device``; the staging ring (at most ``ring_budget`` bytes) is the only memory allocated.
    Tensors whose key has no destination are not read. ``keys`` are the manifest tensors' keys
    (default :func:`tensor_keys`). The source is not closed.
    """
    target = torch.device(device)
    segments, ranges = plan_param_stream(
        manifest.tensors,
        destinations,
        keys=keys if keys is not None else tensor_keys(manifest),
        # On the CPU every request then covers one tensor and is read in place, unstaged.
        merge=target.type != "cpu",
    )
    digests = manifest_digests(manifest) if verify else None
    slot_size = staging_slot_size(digests, request_size, sum(r.length for r in ranges))
    sink = ParamSink(
        segments,
        device=target,
        slots=ring_slots(slot_size, workers, ring_budget),
        slot_size=slot_size,
    )
    return _stream_then_close(
        ranges, sink, source=source, digests=digests, workers=workers, request_size=request_size
    )


def _load_flat(
    tensors: Sequence[ManifestTensor],
    keys: Sequence[str],
    digests: Mapping[str, BlobDigests] | None,
    *,
    source: Source,
    device: torch.device,
    workers: int,
    request_size: int,
) -> tuple[dict[str, torch.Tensor], StreamReport]:
    placements, ranges, size = plan_layout(tensors, keys=keys)
    slot_size = staging_slot_size(digests, request_size, size)
    sink: CpuSink | RingSink
    if device.type == "cpu":
        sink = CpuSink(size)
    else:
        sink = RingSink(
            size, device=device, slots=ring_slots(slot_size, workers), slot_size=slot_size
        )
    report = _stream_then_close(
        ranges, sink, source=source, digests=digests, workers=workers, request_size=request_size
    )
    return {p.key: tensor_view(sink.output, p) for p in placements}, report


def _stream_then_close(
    ranges: Sequence[ByteRange],
    sink: Sink,
    *,
    source: Source,
    digests: Mapping[str, BlobDigests] | None,
    workers: int,
    request_size: int,
) -> StreamReport:
    # The sink's staging memory goes back to the pool whatever happened; the output stays.
    try:
        return stream(
            ranges,
            source=source,
            sink=sink,
            digests=digests,
            request_size=request_size,
            workers=workers,
        )
    finally:
        sink.close()
