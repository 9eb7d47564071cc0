"""Where streamed bytes land: one flat ``uint8`` tensor per load, on the CPU or a GPU.

- :class:`CpuSink`: the output tensor lives in host memory; direct requests are read straight
  into it (no copy at all), the others into a scratch buffer and copied out.
- :class:`RingSink`: the output tensor lives on ``device``; readers fill one of a small ring of
  reused staging buffers, then an asynchronous ``copy_`` on a side stream moves it into place.
  An event per buffer says when the copy is done and the buffer may be filled again. With a CUDA
  device the staging buffers are pinned (page-locked) so the copy is a DMA that overlaps the next
  reads. With a CPU device the same code runs with ordinary buffers and synchronous copies, which
  is how CI exercises the ring logic without a GPU. ``CudaSink`` is its name for CUDA targets.

Pinned memory is slow to allocate (about 0.3 s per GiB), so staging buffers are taken from a
process-wide pool and given back when a sink closes: the ring is paid for once per process, and
never grows with the model.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from loader.ranges import ReadRequest

__all__ = [
    "CpuSink",
    "CudaSink",
    "RingSink",
    "Sink",
    "SinkBuffer",
    "StagingRing",
    "bytes_view",
    "staging_pool",
]


@dataclass(slots=True)
class SinkBuffer:
    """A buffer handed to a reader: ``view`` (exactly the request's length) is filled by it."""

    view: memoryview
    staging: torch.Tensor | None = None


class Sink(Protocol):
    """A destination for read requests; ``acquire``/``commit`` are called from worker threads.

    The flat sinks (:class:`CpuSink`, :class:`RingSink`) also have ``output``, the one tensor
    they fill; :class:`~loader.param_sink.ParamSink` fills tensors that already exist.
    """

    def acquire(self, request: ReadRequest) -> SinkBuffer:
        """A buffer to read ``request`` into (may block until a staging buffer is free)."""

    def commit(self, request: ReadRequest, buffer: SinkBuffer) -> None:
        """Deliver the request's pieces from a filled ``buffer`` and recycle the buffer."""

    def abandon(self, buffer: SinkBuffer) -> None:
        """Recycle a buffer whose read failed."""

    def finish(self) -> None:
        """Wait until every delivered byte is in ``output``."""

    def close(self) -> None:
        """Give staging memory back."""


def bytes_view(tensor: torch.Tensor) -> memoryview:
    """A writable memoryview over a CPU ``uint8`` tensor's storage, without a copy."""
    return tensor.numpy().data.cast("B")


class CpuSink:
    """Bytes land in one flat host tensor of ``size`` bytes; direct reads need no copy."""

    def __init__(self, size: int) -> None:
        self.output = torch.empty(size, dtype=torch.uint8)
        self._view = bytes_view(self.output)

    def acquire(self, request: ReadRequest) -> SinkBuffer:
        if request.direct:
            dest = request.pieces[0].dest
            return SinkBuffer(self._view[dest : dest + request.length])
        return SinkBuffer(memoryview(bytearray(request.length)))

    def commit(self, request: ReadRequest, buffer: SinkBuffer) -> None:
        if request.direct:
            return
        for piece in request.pieces:
            self._view[piece.dest : piece.dest + piece.length] = buffer.view[
                piece.buffer_offset : piece.buffer_offset + piece.length
            ]

    def abandon(self, buffer: SinkBuffer) -> None:
        return None

    def finish(self) -> None:
        return None

    def close(self) -> None:
        return None


class _StagingPool:
    """Process-wide free lists of staging buffers, keyed by (size, pinned)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[int, bool], list[torch.Tensor]] = defaultdict(list)

    def take(self, count: int, size: int, *, pinned: bool) -> list[torch.Tensor]:
        with self._lock:
            free = self._free[(size, pinned)]
            taken = [free.pop() for _ in range(min(count, len(free)))]
        while len(taken) < count:
            taken.append(torch.empty(size, dtype=torch.uint8, pin_memory=pinned))
        return taken

    def give(self, buffers: list[torch.Tensor], *, pinned: bool) -> None:
        with self._lock:
            for buffer in buffers:
                self._free[(buffer.numel(), pinned)].append(buffer)

    def clear(self) -> None:
        """Drop every pooled buffer (frees pinned memory once no sink holds it)."""
        with self._lock:
            self._free.clear()


staging_pool = _StagingPool()


class _Slot:
    """A staging buffer and the event of the last copy out of it (None: nothing in flight)."""

    def __init__(self, buffer: torch.Tensor) -> None:
        self.buffer = buffer
        self.view = bytes_view(buffer)
        self.event: torch.cuda.Event | None = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()
            self.event = None


class StagingRing:
    """``slots`` reused staging buffers of ``slot_size`` bytes, and the copies out of them.

    Readers :meth:`acquire` a buffer and fill it; :meth:`commit` runs the caller's copy out of
    it and frees it for the next read. On CUDA the buffers are pinned and the copies are issued
    on one side stream of ``device``, so they overlap the reads and leave the compute stream
    alone; an event per buffer says when its copy is done and it may be filled again. Elsewhere
    the copies are synchronous and a buffer is free again as soon as ``commit`` returns. The
    flat :class:`RingSink` and :class:`~loader.param_sink.ParamSink` both stage through one.
    """

    def __init__(self, device: torch.device, *, slots: int, slot_size: int) -> None:
        if slots < 1 or slot_size < 1:
            raise ValueError("a ring needs at least one slot of at least one byte")
        self.device = device
        self.cuda = device.type == "cuda"
        self.slot_size = slot_size
        self._stream = torch.cuda.Stream(device=device) if self.cuda else None  # type: ignore[no-untyped-call]
        self._buffers = staging_pool.take(slots, slot_size, pinned=self.cuda)
        self._free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
        self._slots = {id(buffer): _Slot(buffer) for buffer in self._buffers}
        for slot in self._slots.values():
            self._free.put(slot)
        self._closed = False

    @property
    def nbytes(self) -> int:
        """Staging memory held by the ring."""
        return len(self._buffers) * self.slot_size

    def acquire(self, length: int) -> SinkBuffer:
        """A free buffer for a read of ``length`` bytes (blocks until one is free)."""
        if length > self.slot_size:
            raise ValueError(f"request of {length} bytes > slot of {self.slot_size}")
        slot = self._free.get()
        # The previous copy out of this buffer must be done before a reader overwrites it.
        slot.wait()
        return SinkBuffer(slot.view[:length], staging=slot.buffer)

    def commit(self, buffer: SinkBuffer, copy_out: Callable[[torch.Tensor], None]) -> None:
        """Run ``copy_out(staging)`` on the ring's stream, then free the buffer for reuse."""
        slot = self._slot_of(buffer)
        try:
            if self._stream is not None:
                with torch.cuda.stream(self._stream):
                    copy_out(slot.buffer)
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(self._stream)
                slot.event = event
            else:
                copy_out(slot.buffer)
        finally:
            self._free.put(slot)

    def abandon(self, buffer: SinkBuffer) -> None:
        """Free a buffer whose read failed."""
        self._free.put(self._slot_of(buffer))

    def finish(self) -> None:
        """Wait until every copy out of the ring is done."""
        if self._stream is not None:
            self._stream.synchronize()

    def close(self) -> None:
        """Wait for the copies, then give the buffers back to the pool (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.finish()
        staging_pool.give(self._buffers, pinned=self.cuda)

    def _slot_of(self, buffer: SinkBuffer) -> _Slot:
        slot = self._slots.get(id(buffer.staging))
        if slot is None or slot.buffer is not buffer.staging:
            raise ValueError("buffer does not belong to this ring")
        return slot


class RingSink:
    """Bytes go through a ring of ``slots`` staging buffers of ``slot_size`` bytes to ``device``.

    Every request must fit in one slot (``slot_size`` >= the largest request). On CUDA the
    copies are issued on one side stream of the output's device, so they overlap the reads and
    the compute stream is left alone; :meth:`finish` waits for them.
    """

    def __init__(self, size: int, *, device: torch.device | str, slots: int, slot_size: int):
        self.device = torch.device(device)
        self._ring = StagingRing(self.device, slots=slots, slot_size=slot_size)
        self.output = torch.empty(size, dtype=torch.uint8, device=self.device)

    @property
    def slot_size(self) -> int:
        return self._ring.slot_size

    def acquire(self, request: ReadRequest) -> SinkBuffer:
        return self._ring.acquire(request.length)

    def commit(self, request: ReadRequest, buffer: SinkBuffer) -> None:
        self._ring.commit(buffer, lambda staging: self._copy_pieces(request, staging))

    def _copy_pieces(self, request: ReadRequest, staging: torch.Tensor) -> None:
        for piece in request.pieces:
            self.output[piece.dest : piece.dest + piece.length].copy_(
                staging[piece.buffer_offset : piece.buffer_offset + piece.length],
                non_blocking=self._ring.cuda,
            )

    def abandon(self, buffer: SinkBuffer) -> None:
        self._ring.abandon(buffer)

    def finish(self) -> None:
        self._ring.finish()

    def close(self) -> None:
        self._ring.close()


def CudaSink(
    size: int, *, device: torch.device | str = "cuda", slots: int = 8, slot_size: int = 32 << 20
) -> RingSink:
    """A :class:`RingSink` into a CUDA device, through pinned staging buffers."""
    if torch.device(device).type != "cuda":
        raise ValueError(f"CudaSink needs a CUDA device, not {device}")
    return RingSink(size, device=device, slots=slots, slot_size=slot_size)
