"""The digests a blob is known by, computed in one place for the node and the replica alike.

A blob is named by the sha256 of its bytes and carries one xxh3-128 digest per
:data:`CHUNK_SIZE` chunk, chunks aligned to its first byte (the last one may be shorter; an
empty blob has the one digest of no bytes). The node computes both while it writes a blob (an
origin transfer, a rank shard), checks the chunk digests whenever it serves a range, and the
replica checks them again on what it receives. Standard library and xxhash only.
"""

from __future__ import annotations

import hashlib
from typing import Any, Protocol

import xxhash

from loader.preads import read_at

__all__ = [
    "CHUNK_SIZE",
    "BlobHasher",
    "chunk_digest",
    "chunk_digests",
    "feed_region",
    "hash_region",
]

#: Blobs carry one xxh3-128 digest per chunk of this many bytes (the last chunk may be shorter).
CHUNK_SIZE = 64 * 1024 * 1024
#: A region of a file is hashed this much at a time: a check holds 1 MiB, not the 64 MiB chunk
#: it covers.
_HASH_BLOCK = 1024 * 1024


class _Hasher(Protocol):
    def update(self, data: bytes, /) -> Any: ...


def chunk_digest(data: bytes | memoryview) -> str:
    """The xxh3-128 hex digest of one chunk's bytes."""
    return str(xxhash.xxh3_128_hexdigest(data))


class BlobHasher:
    """The sha256 and the per-chunk xxh3-128 digests of a blob, fed its bytes in order."""

    def __init__(self, *, chunk_size: int = CHUNK_SIZE) -> None:
        self.chunk_size = chunk_size
        self._sha256 = hashlib.sha256()
        self._chunk = xxhash.xxh3_128()
        self._chunk_fill = 0
        self._chunks: list[str] = []
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        """Feed the next bytes of the blob."""
        # Flat bytes: a numpy buffer's memoryview is n-dimensional and len() counts its rows.
        view = memoryview(data).cast("B")
        self._sha256.update(view)
        self.size += len(view)
        while len(view):
            take = min(len(view), self.chunk_size - self._chunk_fill)
            self._chunk.update(view[:take])
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == self.chunk_size:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = xxhash.xxh3_128()
                self._chunk_fill = 0

    @property
    def sha256_hex(self) -> str:
        """The sha256 of every byte fed so far."""
        return self._sha256.hexdigest()

    def chunks(self) -> list[str]:
        """The chunk digests of the whole blob: call once every byte is fed (closes the last,
        shorter chunk; an empty blob has the digest of no bytes)."""
        if self._chunk_fill or not self._chunks:
            self._chunks.append(self._chunk.hexdigest())
            self._chunk = xxhash.xxh3_128()
            self._chunk_fill = 0
        return list(self._chunks)


def chunk_digests(data: bytes | memoryview, *, chunk_size: int = CHUNK_SIZE) -> list[str]:
    """The chunk digests of ``data`` (for small in-memory blobs)."""
    hasher = BlobHasher(chunk_size=chunk_size)
    hasher.update(data)
    return hasher.chunks()


def feed_region(
    fd: int, offset: int, length: int, hasher: _Hasher, *, block_size: int = _HASH_BLOCK
) -> int:
    """Feed ``length`` bytes of ``fd`` from ``offset`` to ``hasher``, ``block_size`` at a time;
    returns the bytes fed (fewer when the file is shorter)."""
    position = offset
    stop = offset + length
    while position < stop:
        want = min(block_size, stop - position)
        data = read_at(fd, want, position)
        if data:
            hasher.update(data)
        position += len(data)
        if len(data) < want:
            break
    return position - offset


def hash_region(fd: int, offset: int, length: int) -> str:
    """The xxh3-128 hex digest of ``length`` bytes of ``fd`` from ``offset`` (a chunk on disk)."""
    hasher = xxhash.xxh3_128()
    feed_region(fd, offset, length, hasher)
    return str(hasher.hexdigest())
