"""Where a node keeps its metadata: a small key-value protocol, and its diskcache implementation.

Values are JSON-compatible dicts. Keys are namespaced strings (``blob:<sha>``, ``pipeline:<id>``).
diskcache is SQLite in WAL mode, safe across threads and processes of one host; a multi-node region
swaps in a Redis implementation of the same protocol. Metadata never lives on NFS.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import diskcache

from cache_node.disk import DiskGuard, is_no_space
from cache_node.errors import InsufficientStorage


class KeyValue(Protocol):
    """The metadata operations the store and the registry need."""

    def get(self, key: str) -> dict[str, Any] | None: ...

    def set(self, key: str, value: dict[str, Any]) -> None: ...

    def delete(self, key: str) -> None: ...

    def scan(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def close(self) -> None: ...


class DiskcacheKeyValue:
    """:class:`KeyValue` on diskcache (SQLite, WAL, synchronous commits)."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        # sqlite_synchronous=2 (FULL): a metadata commit is durable before we answer, because
        # the blob it describes was fsynced first (I3) and the pair must survive power loss.
        self._cache = diskcache.Cache(
            str(directory), size_limit=2**40, eviction_policy="none", sqlite_synchronous=2
        )
        #: Called when a write finds the disk full, to free room (the node drops its headroom
        #: ballast); the write is then tried once more. Recording a failure, a deletion or an
        #: eviction must work on a full disk.
        self.on_full: Callable[[BaseException], object] | None = None

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self._cache.get(key)
        return None if raw is None else dict(json.loads(raw))

    def set(self, key: str, value: dict[str, Any]) -> None:
        text = json.dumps(value, separators=(",", ":"))
        self._write(lambda: self._cache.set(key, text))

    def delete(self, key: str) -> None:
        self._write(lambda: self._cache.delete(key))

    def _write(self, write: Callable[[], object]) -> None:
        try:
            write()
        except Exception as exc:
            # sqlite3.OperationalError "database or disk is full", or an OSError ENOSPC
            if self.on_full is None or not is_no_space(exc):
                raise
            self.on_full(exc)
            try:
                write()
            except Exception as again:
                if not is_no_space(again):
                    raise
                raise InsufficientStorage(
                    "disk full: the metadata store cannot write, even after giving up the "
                    "node's headroom",
                    reason="disk_full",
                ) from again

    def scan(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        # A range over SQLite's (key, raw) index: the cost is that of the matching keys, not of
        # every key (one tenant's pipelines among thousands). Text keys are stored raw, compared
        # bytewise as UTF-8, which orders like code points, so chr(0x10FFFF) ends the range.
        rows = self._cache._sql(
            "SELECT key FROM Cache WHERE raw = 1 AND key >= ? AND key < ? ORDER BY key",
            (prefix, prefix + "\U0010ffff"),
        ).fetchall()
        for (key,) in rows:
            if isinstance(key, str) and key.startswith(prefix):
                value = self.get(key)
                if value is not None:
                    yield key, value

    def close(self) -> None:
        self._cache.close()


def open_metadata(directory: Path, disk: DiskGuard) -> DiskcacheKeyValue:
    """The node's metadata store, opened even on a full disk (SQLite writes when it opens).

    On "disk full" the startup ballast goes (see ``cache_node.disk``) and the open is tried
    again; a disk that is still too full is a clear InsufficientStorage, not a traceback.
    """
    try:
        kv = DiskcacheKeyValue(directory)
    except Exception as exc:
        if not is_no_space(exc):
            raise
        disk.report_full("opening the metadata store", exc)
        disk.release_startup_ballast()
        try:
            kv = DiskcacheKeyValue(directory)
        except Exception as again:
            if not is_no_space(again):
                raise
            raise InsufficientStorage(
                f"disk full: the metadata store at {directory} cannot open; free space on its "
                "filesystem and start the node again",
                reason="disk_full",
            ) from again
    kv.on_full = lambda exc: disk.report_full("writing metadata", exc)
    return kv
