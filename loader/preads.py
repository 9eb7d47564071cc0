"""Positioned reads of an exact length: the one loop every reader of a blob or partial file uses.

``os.pread`` and ``os.preadv`` may return fewer bytes than asked without the file having ended
(a signal, a network or FUSE filesystem), so a single call is never "the bytes at that offset".
These helpers loop until every byte asked for is there or the file ends, and leave the caller
to say what a short file means (a damaged blob, a short partial, a source error). Standard
library only: both the node and the replica side read blobs with them.
"""

from __future__ import annotations

import os

__all__ = ["read_at", "read_into_at"]


def read_at(fd: int, length: int, offset: int) -> bytes:
    """``length`` bytes of ``fd`` from ``offset``; fewer only where the file ends."""
    data = os.pread(fd, length, offset)
    if len(data) == length or not data:
        return data
    pieces = [data]
    got = len(data)
    while got < length:
        more = os.pread(fd, length - got, offset + got)
        if not more:
            break
        pieces.append(more)
        got += len(more)
    return b"".join(pieces)


def read_into_at(fd: int, buffer: memoryview, offset: int) -> int:
    """Fill ``buffer`` with the bytes of ``fd`` from ``offset``, straight into it (no copy).

    Returns how many bytes arrived: ``len(buffer)``, or fewer only where the file ends.
    """
    total = len(buffer)
    done = 0
    while done < total:
        count = os.preadv(fd, [buffer[done:]], offset + done)
        if count == 0:
            break
        done += count
    return done
