"""Verify on read (I2): no byte of a blob leaves the node before its chunk matched its digest.

Every range served is checked chunk by chunk against the blob's record; a chunk that does not
match, or a file that changes while it is served, quarantines the blob (it is never served
again and the pipelines that need it fetch it again) and raises ``IntegrityError``. A chunk
verified once is remembered while its file keeps the inode, size and mtime it had, so a
replica's many range requests into one 64 MiB chunk hash it once.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from cache_node.blob_records import BlobRecord
from cache_node.errors import IntegrityError, InvalidInput
from loader.digests import hash_region
from loader.preads import read_at

__all__ = ["ChunkChecks"]

#: File timestamps are coarse (a kernel tick, a few ms). A chunk is remembered as verified only
#: when the file was last written more than this long ago, so any later write, even within the
#: same tick as the check, leaves a different mtime and voids the memo.
_MEMO_SETTLE_NS = 100_000_000

_Identity = tuple[int, int, int]


class ChunkChecks:
    """The chunk checks of one store, and the memo of chunks already verified.

    ``quarantine(sha256, reason)`` is the store's: it moves the blob aside (or, in a reader
    process, asks the owner to) and calls :meth:`forget`.
    """

    def __init__(self, quarantine: Callable[[str, str], None]) -> None:
        self._quarantine = quarantine
        self._lock = threading.Lock()
        self._verified: dict[tuple[str, int], _Identity] = {}

    def forget(self, sha256: str) -> None:
        """Drop what is remembered of a blob (it was quarantined or is going away)."""
        with self._lock:
            for key in [k for k in self._verified if k[0] == sha256]:
                del self._verified[key]

    def verify_range(self, record: BlobRecord, handle: Any, start: int, end: int) -> None:
        """Check the chunks covering ``[start, end)`` of an open blob; quarantine and raise
        IntegrityError on a mismatch.

        For servers that send the bytes themselves (sendfile from ``handle``) as much as for
        :meth:`iter_verified`: a chunk is hashed as a stream (1 MiB at a time), once while the
        file keeps its inode, size and mtime.
        """
        if not 0 <= start <= end <= record.size:
            raise InvalidInput(f"range {start}-{end} outside blob of {record.size} bytes")
        stat = os.fstat(handle.fileno())
        identity = _identity(stat)
        for index in range(start // record.chunk_size, -(-end // record.chunk_size)):
            if self._verified.get((record.sha256, index)) == identity:
                continue
            offset = index * record.chunk_size
            length = min(record.chunk_size, record.size - offset)
            if stat.st_size != record.size or (
                hash_region(handle.fileno(), offset, length) != record.chunk_xxh3_128[index]
            ):
                raise self._reject(
                    record.sha256,
                    f"chunk {index} mismatch",
                    f"blob {record.sha256} chunk {index} failed verification",
                    chunk=index,
                )
            if _settled(stat):
                with self._lock:
                    self._verified[(record.sha256, index)] = identity

    def iter_verified(
        self, record: BlobRecord, handle: BinaryIO, start: int, end: int, *, piece_size: int
    ) -> Iterator[bytes]:
        """Yield ``[start, end)`` of an open blob, each chunk verified before any of it leaves.

        A checked chunk is read again in pieces of at most ``piece_size`` bytes, so a reader
        holds one piece, never a 64 MiB chunk. The file must keep the identity it had when
        checked (a write voids the check) or the stream stops with IntegrityError.
        """
        if not 0 <= start <= end <= record.size:
            raise InvalidInput(f"range {start}-{end} outside blob of {record.size} bytes")
        sha256 = record.sha256
        fd = handle.fileno()
        identity = _identity(os.fstat(fd))
        position = start
        while position < end:
            stop = min(end, (position // record.chunk_size + 1) * record.chunk_size)
            self.verify_range(record, handle, position, stop)
            while position < stop:
                if _identity(os.fstat(fd)) != identity:
                    raise self._reject(
                        sha256,
                        "changed while served",
                        f"blob {sha256} was written to while it was served",
                    )
                piece = read_at(fd, min(piece_size, stop - position), position)
                if not piece:
                    raise IntegrityError(f"blob {sha256} is shorter than its record")
                yield piece
                position += len(piece)

    def _reject(self, sha256: str, reason: str, message: str, **details: Any) -> IntegrityError:
        """Quarantine a blob that failed a check; the error to raise for it."""
        self._quarantine(sha256, reason)
        return IntegrityError(message, sha256=sha256, **details)


def _identity(stat: os.stat_result) -> _Identity:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _settled(stat: os.stat_result) -> bool:
    return time.time_ns() - stat.st_mtime_ns > _MEMO_SETTLE_NS
