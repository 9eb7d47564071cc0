"""The resume record of one origin transfer: which parts of its partial file are complete.

Beside ``tmp/<key>.partial`` a transfer keeps ``tmp/<key>.journal``: a JSON header (the object's
size and ETag) and one line per finished part with the part's xxh3-64. A part reaches the
journal only after the partial file was fsynced with it, so after a crash every part the
journal names is on disk; it is still re-hashed from disk before it is trusted, and a journal
written for another version of the object starts over.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import xxhash

from loader.digests import feed_region

__all__ = ["FLUSH_INTERVAL_S", "TransferJournal"]

#: How often finished parts are made durable for resume (seconds).
FLUSH_INTERVAL_S = 0.5


class TransferJournal:
    """The durable record of which parts of a partial file are complete."""

    def __init__(self, path: Path, *, size: int, etag: str | None) -> None:
        self.path = path
        self.header = {"size": size, "etag": etag}
        self._pending: list[dict[str, int]] = []
        self._pending_bytes = 0
        self._flush_bytes = size // 64
        self._flushed_at = time.monotonic()

    def recover(self, partial: Path, parts: list[tuple[int, int]]) -> set[int]:
        """Parts already on disk whose bytes still match the journal (re-hashed from disk)."""
        if not self.path.exists() or not partial.exists():
            self._start()
            return set()
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
            entries = [json.loads(line) for line in lines[1:] if line.strip()]
        except (IndexError, ValueError):
            self._start()
            return set()
        if header != self.header:
            self._start()
            return set()
        done: set[int] = set()
        fd = os.open(partial, os.O_RDONLY)
        try:
            for entry in entries:
                index, digest = int(entry["part"]), int(entry["xxh3_64"])
                if not 0 <= index < len(parts):
                    continue
                start, end = parts[index]
                hasher = xxhash.xxh3_64()
                complete = feed_region(fd, start, end - start, hasher) == end - start
                if complete and hasher.intdigest() == digest:
                    done.add(index)
        finally:
            os.close(fd)
        return done

    def _start(self) -> None:
        self.path.write_text(json.dumps(self.header) + "\n")

    def add_part(self, index: int, digest: int, *, nbytes: int) -> None:
        """Note a finished part; it reaches the journal at the next :meth:`flush`."""
        self._pending.append({"part": index, "xxh3_64": digest})
        self._pending_bytes += nbytes

    def due(self) -> bool:
        """Whether to make progress durable now.

        An fsync per part costs a large share of a fast transfer, so parts are batched up to
        1/64 of the file (a crash then re-fetches at most that much, never anything wrong)
        or ``FLUSH_INTERVAL_S``, whichever comes first.
        """
        if not self._pending:
            return False
        return (
            self._pending_bytes >= self._flush_bytes
            or time.monotonic() - self._flushed_at >= FLUSH_INTERVAL_S
        )

    def flush(self, fd: int) -> None:
        """Make the noted parts durable, then record them (in that order)."""
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        self._flushed_at = time.monotonic()
        if not pending:
            return
        os.fsync(fd)  # the bytes are on disk before the journal says so
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(entry) + "\n" for entry in pending))
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
