"""Counters that data-plane worker processes share with the node: one small mmap file per slot.

A worker adds to its slot's counters in shared memory (a ``MAP_SHARED`` file mapping), so the
node reads them without asking the worker, and nothing is lost when a worker dies, even by
``kill -9``: the pages belong to the file, not to the process. A restarted worker attaches to
the same slot and keeps counting from where its predecessor stopped, so the node's totals stay
right across restarts. The files are created (zeroed) when the data plane starts; a counter
resets when the node restarts, as Prometheus counters do.
"""

from __future__ import annotations

import mmap
import os
import struct
import threading
from pathlib import Path

__all__ = ["FIELDS", "WorkerStats", "read_totals", "reset_stats_dir"]

#: Every counter of a slot, in file order (unsigned 64-bit, native byte order).
FIELDS = (
    "bytes_served",  # body bytes handed to the kernel by completed sendfile calls
    "requests",
    "responses_2xx",
    "responses_4xx",
    "responses_5xx",
    "blob_lookups",  # authorisations of a blob request
    "meta_reads",  # metadata records read to authorise them (gets and scanned records)
    "tokens_reloads",  # new versions of the tokens file taken into force
    "tokens_reload_failures",  # versions that could not be used (the old tokens kept)
    "tokens_stale",  # 1 while the worker serves with an older tokens file (set, not added)
)
_INDEX = {name: i for i, name in enumerate(FIELDS)}
_SIZE = 8 * len(FIELDS)


def _slot_path(directory: Path, slot: int) -> Path:
    return directory / f"worker-{slot}.stats"


def reset_stats_dir(directory: Path, slots: int) -> None:
    """Create the stats directory with ``slots`` zeroed files, removing any older ones."""
    directory.mkdir(parents=True, exist_ok=True)
    for entry in directory.glob("worker-*.stats"):
        entry.unlink()
    for slot in range(slots):
        _slot_path(directory, slot).write_bytes(bytes(_SIZE))


class WorkerStats:
    """One slot's counters, mapped into this process (a worker writes, the node reads)."""

    def __init__(self, directory: Path, slot: int) -> None:
        path = _slot_path(directory, slot)
        fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0))
        try:
            if os.fstat(fd).st_size < _SIZE:
                os.ftruncate(fd, _SIZE)
            self._map = mmap.mmap(fd, _SIZE, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._lock = threading.Lock()

    def add(self, name: str, amount: int = 1) -> None:
        """Add ``amount`` to counter ``name`` (one writer per slot: the worker's event loop)."""
        offset = 8 * _INDEX[name]
        with self._lock:
            (value,) = struct.unpack_from("=Q", self._map, offset)
            struct.pack_into("=Q", self._map, offset, value + amount)

    def set(self, name: str, value: int) -> None:
        """Set counter ``name`` (a 0/1 state rather than a count; a new worker overwrites it)."""
        with self._lock:
            struct.pack_into("=Q", self._map, 8 * _INDEX[name], value)

    def read(self) -> dict[str, int]:
        """Every counter of this slot."""
        return dict(zip(FIELDS, struct.unpack_from(f"={len(FIELDS)}Q", self._map, 0), strict=True))

    def close(self) -> None:
        self._map.close()


def read_totals(directory: Path) -> dict[str, int]:
    """Every counter summed over the slots in ``directory`` (zeros when there are none)."""
    totals = dict.fromkeys(FIELDS, 0)
    for entry in sorted(directory.glob("worker-*.stats")):
        try:
            values = struct.unpack_from(f"={len(FIELDS)}Q", entry.read_bytes().ljust(_SIZE, b"\0"))
        except OSError:
            continue  # a slot file removed under us: a data plane being reset
        for name, value in zip(FIELDS, values, strict=True):
            totals[name] += value
    return totals
