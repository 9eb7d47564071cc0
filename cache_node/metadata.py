"""Where a node keeps its metadata: a small key-value protocol, and its diskcache implementation.

Values are JSON-compatible dicts. Keys are namespaced strings (``blob:<sha>``, ``pipeline:<id>``).
diskcache is SQLite in WAL mode, safe across threads and processes of one host; a multi-node region
swaps in a Redis implementation of the same protocol. Metadata never lives on NFS.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import diskcache


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

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self._cache.get(key)
        return None if raw is None else dict(json.loads(raw))

    def set(self, key: str, value: dict[str, Any]) -> None:
        self._cache.set(key, json.dumps(value, separators=(",", ":")))

    def delete(self, key: str) -> None:
        self._cache.delete(key)

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
