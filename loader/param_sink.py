"""A sink whose destinations are existing tensors: a rank's bytes land in the engine's parameters.

``load()`` streams a rank into one fresh flat allocation; an engine that already allocated its
parameters would then copy them over and hold the weights twice. :class:`ParamSink` instead
delivers every byte straight into the tensors the engine owns (whole parameters, blocks of rows
of fused ``qkv_proj`` / ``gate_up_proj``, vocab rows), so the only extra memory is the staging
ring (``slots × slot_size``), whatever the model's size:

- on the CPU, a request that covers one destination of the same dtype is read straight into the
  parameter's bytes (no staging at all), unless it is a chunk to verify first; the others go
  through the ring;
- on an accelerator, readers fill pinned (CUDA) staging buffers and the copy into the parameter
  runs on a side stream, as :class:`~loader.sinks.RingSink` does.

Dtypes: a checkpoint in bf16 feeding an fp32 engine (or the reverse) is cast as each staging
buffer is copied out, the way vLLM's weight loaders cast in ``param.data.copy_(loaded)``; never
by a second full copy of the weights.

The byte ranges to stream are planned by :func:`plan_param_stream`: each destination gets a
place in a *virtual* address space (nothing is allocated there); ranges of the same dtype that
are adjacent in a blob stay adjacent there, so they merge into long reads.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from api.schema import ManifestTensor
from loader.layout import torch_dtype
from loader.ranges import ByteRange, ReadRequest
from loader.sinks import SinkBuffer, StagingRing, bytes_view
from loader.vllm_weights import WeightMismatch

__all__ = ["ParamSegment", "ParamSink", "plan_param_stream"]


@dataclass(frozen=True)
class ParamSegment:
    """One destination: ``length`` source bytes at virtual address ``start`` fill ``dest``."""

    name: str
    start: int
    length: int
    dest: torch.Tensor
    src_dtype: torch.dtype

    @property
    def end(self) -> int:
        return self.start + self.length

    @property
    def same_dtype(self) -> bool:
        return self.src_dtype == self.dest.dtype


def plan_param_stream(
    tensors: Sequence[ManifestTensor], destinations: Mapping[str, torch.Tensor],
    *, keys: Sequence[str], merge: bool = True,
) -> tuple[list[ParamSegment], list[ByteRange]]:
    """Segments and byte ranges that stream ``tensors`` (named ``keys``) into ``destinations``.

    Every key must have a destination of the same number of elements (the shapes were matched
    when the destinations were planned); a destination must be contiguous. Keys without a
    destination are not streamed (tensors the engine skips). ``merge`` lets same-dtype
    neighbours in a blob share reads; without it every request covers one tensor.
    """
    order = sorted(
        (i for i, key in enumerate(keys) if key in destinations),
        key=lambda i: (tensors[i].blob, tensors[i].offset),
    )
    segments: list[ParamSegment] = []
    ranges: list[ByteRange] = []
    cursor = 0
    previous: tuple[str, int, bool] | None = None  # (blob, end offset, same dtype)
    for index in order:
        tensor, key = tensors[index], keys[index]
        # Detached: the same storage, writable from the stream's worker threads, which do not
        # inherit the caller's no_grad mode (vLLM's parameters may still require grad).
        dest = destinations[key].detach()
        src_dtype = torch_dtype(tensor.dtype)
        itemsize = torch.empty((), dtype=src_dtype).element_size()
        if dest.numel() * itemsize != tensor.length or list(dest.shape) != list(tensor.shape):
            raise WeightMismatch(
                f"{key}: {tensor.length} bytes of {tensor.dtype} {tensor.shape} do not fill "
                f"the destination of shape {list(dest.shape)}",
                code="shape_mismatch",
                tensor=key,
            )
        if not dest.is_contiguous():
            raise WeightMismatch(
                f"{key}: destination of shape {list(dest.shape)} is not contiguous",
                code="not_contiguous",
                tensor=key,
            )
        same = src_dtype == dest.dtype
        adjacent = (
            merge
            and previous is not None
            and previous == (tensor.blob, tensor.offset, True)
            and same
        )
        if not adjacent:
            cursor += 1  # a gap: only same-dtype neighbours in one blob merge into one read
        segments.append(ParamSegment(key, cursor, tensor.length, dest, src_dtype))
        ranges.append(ByteRange(tensor.blob, tensor.offset, tensor.length, cursor))
        cursor += tensor.length
        previous = (tensor.blob, tensor.offset + tensor.length, same)
    segments.sort(key=lambda s: s.start)
    return segments, ranges


class ParamSink:
    """Delivers read requests into :class:`ParamSegment` destinations on ``device``.

    ``slots`` staging buffers of ``slot_size`` bytes (each request must fit in one) are the
    only memory it allocates; :attr:`ring_bytes` says how much.
    """

    def __init__(
        self,
        segments: Sequence[ParamSegment],
        *,
        device: torch.device | str,
        slots: int,
        slot_size: int,
    ) -> None:
        self.device = torch.device(device)
        for segment in segments:
            if segment.dest.device != self.device:
                raise WeightMismatch(
                    f"{segment.name}: destination is on {segment.dest.device}, not "
                    f"{self.device}",
                    code="shape_mismatch",
                )
        self._segments = list(segments)
        self._starts = [s.start for s in self._segments]
        self._cpu = self.device.type == "cpu"
        self._cuda = self.device.type == "cuda"
        self._ring = StagingRing(self.device, slots=slots, slot_size=slot_size)
        self._direct = {
            id(s): bytes_view(s.dest.view(-1).view(torch.uint8))
            for s in self._segments
            if self._cpu and s.same_dtype
        }
        # Casting on the GPU: each slot's raw bytes go to one device buffer, then cast from
        # there into the parameter. copy_ across devices *and* dtypes would allocate a device
        # temporary per call, one per slot in flight (the whole ring again, on the GPU).
        # One buffer is enough: every copy is queued on the one stream, in order, so the next
        # upload into it starts after the previous cast read it; the lock keeps each
        # upload-then-cast pair together on that queue.
        self._cast_buffer: torch.Tensor | None = None
        self._cast_lock = threading.Lock()

    @property
    def ring_bytes(self) -> int:
        """Staging memory held by this sink."""
        return self._ring.nbytes

    def _overlaps(self, start: int, end: int) -> list[ParamSegment]:
        index = max(bisect.bisect_right(self._starts, start) - 1, 0)
        found = []
        while index < len(self._segments) and self._segments[index].start < end:
            segment = self._segments[index]
            if segment.end > start:
                found.append(segment)
            index += 1
        return found

    def acquire(self, request: ReadRequest) -> SinkBuffer:
        # A request with a chunk digest is staged even on the CPU: its bytes reach the
        # parameters only once they passed the check, so a chunk that fails changes nothing.
        if request.direct and self._cpu and request.chunk_digest is None:
            piece = request.pieces[0]
            overlaps = self._overlaps(piece.dest, piece.dest + piece.length)
            if len(overlaps) == 1 and id(overlaps[0]) in self._direct:
                segment = overlaps[0]
                if segment.start <= piece.dest and piece.dest + piece.length <= segment.end:
                    at = piece.dest - segment.start
                    return SinkBuffer(self._direct[id(segment)][at : at + piece.length])
        return self._ring.acquire(request.length)

    def commit(self, request: ReadRequest, buffer: SinkBuffer) -> None:
        if buffer.staging is None:
            return  # read straight into the parameter
        self._ring.commit(buffer, lambda staging: self._deliver(request, staging))

    def _deliver(self, request: ReadRequest, staging: torch.Tensor) -> None:
        for piece in request.pieces:
            end = piece.dest + piece.length
            for segment in self._overlaps(piece.dest, end):
                lo, hi = max(piece.dest, segment.start), min(end, segment.end)
                source = staging[piece.buffer_offset + lo - piece.dest :][: hi - lo]
                self._copy(segment, lo - segment.start, source)

    def _copy(self, segment: ParamSegment, offset: int, source: torch.Tensor) -> None:
        if segment.same_dtype:
            target = segment.dest.view(-1).view(torch.uint8)[offset : offset + source.numel()]
            target.copy_(source, non_blocking=self._cuda)
            return
        itemsize = torch.empty((), dtype=segment.src_dtype).element_size()
        if offset % itemsize or source.numel() % itemsize:
            raise WeightMismatch(
                f"{segment.name}: a read split an element of {segment.src_dtype} at byte "
                f"{offset}; cannot cast it to {segment.dest.dtype}",
                code="misaligned",
                tensor=segment.name,
            )
        first = offset // itemsize
        target = segment.dest.view(-1)[first : first + source.numel() // itemsize]
        # The cast happens here, per staging buffer, as vLLM's copy_ casts per tensor.
        if self._cuda:
            with self._cast_lock:
                if self._cast_buffer is None:
                    self._cast_buffer = torch.empty(
                        self._ring.slot_size, dtype=torch.uint8, device=self.device
                    )
                raw = self._cast_buffer[: source.numel()]
                raw.copy_(source, non_blocking=True)
                target.copy_(raw.view(segment.src_dtype), non_blocking=True)
            return
        if source.storage_offset() % itemsize:
            source = source.clone()  # at most one slot: typed views need element alignment
        target.copy_(source.view(segment.src_dtype))

    def abandon(self, buffer: SinkBuffer) -> None:
        if buffer.staging is not None:
            self._ring.abandon(buffer)

    def finish(self) -> None:
        self._ring.finish()

    def close(self) -> None:
        self._ring.close()
        self._cast_buffer = None
