"""Where blob bytes come from: local blob files, or HTTP range requests to cache nodes.

A source fills a caller's buffer with ``len(buffer)`` bytes at ``offset`` of a blob, from any
thread, or raises :class:`~loader.errors.SourceError`. Both sources read straight into the
buffer (``os.preadv`` / ``HTTPResponse.readinto``), so the bytes are copied once, by the kernel.
"""

from __future__ import annotations

import http.client
import logging
import os
import queue
import threading
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Protocol

from clients.client import auth_headers
from loader.content_range import parse_content_range
from loader.errors import RangeResponseError, SourceError
from loader.preads import read_into_at

__all__ = ["HttpRangeSource", "LocalFileSource", "RoutingSource", "Source", "blob_path"]

log = logging.getLogger("weightcache.loader")


class Source(Protocol):
    """Something that can fill buffers with blob bytes, from many threads at once."""

    def prepare(self, blobs: Iterable[str]) -> None:
        """Open what the reads of ``blobs`` need (files, connections); timed as 'connect'."""

    def read_into(self, blob: str, offset: int, buffer: memoryview) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` of ``blob``, or raise SourceError."""

    def close(self) -> None:
        """Release files and connections."""


def blob_path(data_dir: Path, sha256: str) -> Path:
    """Where a node keeps blob ``sha256`` under its data dir: ``blobs/<sha[:2]>/<sha>``."""
    return data_dir / "blobs" / sha256[:2] / sha256


class LocalFileSource:
    """Reads blob files of a node data dir on this host with positional reads (no locks)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = Path(data_dir)
        self._lock = threading.Lock()
        self._fds: dict[str, int] = {}

    def has(self, blob: str) -> bool:
        """Whether the blob's file exists here."""
        return blob_path(self.data_dir, blob).is_file()

    def prepare(self, blobs: Iterable[str]) -> None:
        for blob in blobs:
            self._fd(blob)

    def _fd(self, blob: str) -> int:
        with self._lock:
            fd = self._fds.get(blob)
            if fd is None:
                path = blob_path(self.data_dir, blob)
                try:
                    # O_NOFOLLOW: a symlink planted in the data dir is never followed.
                    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                except OSError as error:
                    raise SourceError(f"cannot open blob {blob} at {path}: {error}") from error
                self._fds[blob] = fd
            return fd

    def read_into(self, blob: str, offset: int, buffer: memoryview) -> None:
        fd = self._fd(blob)
        total = len(buffer)
        try:
            done = read_into_at(fd, buffer, offset)
        except OSError as error:
            raise SourceError(f"reading blob {blob} at {offset}: {error}") from error
        if done < total:
            raise SourceError(
                f"blob {blob} is short: no bytes at offset {offset + done} "
                f"({total - done} of {total} still wanted)"
            )

    def close(self) -> None:
        with self._lock:
            fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)


class RoutingSource:
    """Reads each blob from ``local`` when its file is there, from ``remote`` otherwise."""

    def __init__(self, local: LocalFileSource, remote: Source | None) -> None:
        self.local = local
        self.remote = remote
        self._local_blobs: set[str] = set()

    def prepare(self, blobs: Iterable[str]) -> None:
        remote = []
        for blob in blobs:
            if self.local.has(blob):
                self._local_blobs.add(blob)
            else:
                remote.append(blob)
        self.local.prepare(self._local_blobs)
        if remote:
            if self.remote is None:
                raise SourceError(f"blobs {remote[:3]} are not in {self.local.data_dir}")
            self.remote.prepare(remote)

    def read_into(self, blob: str, offset: int, buffer: memoryview) -> None:
        if blob in self._local_blobs:
            self.local.read_into(blob, offset, buffer)
        elif self.remote is not None:
            self.remote.read_into(blob, offset, buffer)
        else:
            raise SourceError(f"blob {blob} is not in {self.local.data_dir}")

    def close(self) -> None:
        self.local.close()
        if self.remote is not None:
            self.remote.close()


class _Endpoint:
    """One base URL and its idle keep-alive connections."""

    def __init__(self, base_url: str, *, timeout: float) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"base URL must be http(s)://host[:port][/prefix], not {base_url!r}")
        self.base_url = base_url
        self.https = parsed.scheme == "https"
        self.host = parsed.hostname
        self.port = parsed.port
        self.prefix = parsed.path.rstrip("/")
        self.timeout = timeout
        self.idle: queue.SimpleQueue[http.client.HTTPConnection] = queue.SimpleQueue()

    def connect(self) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
        connection = cls(self.host, self.port, timeout=self.timeout)
        connection.connect()
        return connection

    def take(self) -> tuple[http.client.HTTPConnection, bool]:
        """An idle connection (reused=True) or a new one."""
        try:
            return self.idle.get_nowait(), True
        except queue.Empty:
            return self.connect(), False

    def close(self) -> None:
        while True:
            try:
                self.idle.get_nowait().close()
            except queue.Empty:
                return


class HttpRangeSource:
    """Parallel HTTP range requests to ``GET {base_url}/v1/blobs/{sha256}``, with failover.

    Requests start at a base URL picked by the blob and offset, so the reads of one load spread
    over every node given; when one fails (connection error, bad status, a wrong
    ``Content-Range`` or a short body) the same range is asked of the next one. A base URL that
    failed is tried last afterwards. Each thread borrows a keep-alive connection and reads the
    body with ``readinto`` straight into the caller's buffer.

    ``fallback_urls`` (the node's API, beside its data plane) are used only once the base URLs
    fail (refused, reset, 5xx, a wrong answer): from then on the remaining ranges go to them.
    Every byte is still checked the same way; ``fallback_reads`` counts the ranges they served
    and ``fallback_reason`` says why, and the switch is logged: never a silent change of path.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 60.0,
        connections: int = 8,
        fallback_urls: Sequence[str] = (),
    ) -> None:
        if not base_urls:
            raise ValueError("at least one base URL is needed")
        self._endpoints = [_Endpoint(url, timeout=timeout) for url in [*base_urls, *fallback_urls]]
        self._primaries = len(base_urls)
        self._headers = auth_headers(token)
        self._connections = connections
        self._failed: set[int] = set()
        self._lock = threading.Lock()
        self.fallback_reads = 0
        self.fallback_reason: str | None = None

    def prepare(self, blobs: Iterable[str]) -> None:
        # Open the keep-alive connections of the first reachable endpoint up front, so that
        # 'connect' is measured on its own and the first reads do not queue on handshakes.
        for index, endpoint in enumerate(self._endpoints):
            try:
                for _ in range(self._connections):
                    endpoint.idle.put(endpoint.connect())
                return
            except OSError as error:
                self._mark_failed(index, f"{endpoint.base_url}: {error}")
        raise SourceError(
            "no cache node reachable: "
            + ", ".join(endpoint.base_url for endpoint in self._endpoints)
        )

    def _mark_failed(self, index: int, reason: str) -> None:
        with self._lock:
            first = index not in self._failed
            self._failed.add(index)
            if index < self._primaries and self.fallback_reason is None:
                self.fallback_reason = reason
        if first and index < self._primaries:
            log.warning("cache node URL failed: %s; its ranges go to the others%s", reason,
                        " (then the node's API)" if len(self._endpoints) > self._primaries else "")

    def _order(self, blob: str, offset: int) -> list[int]:
        count = self._primaries
        first = (int(blob[:8], 16) + offset // (1 << 20)) % count if _is_hex(blob[:8]) else 0
        rotated = [(first + i) % count for i in range(count)]
        rotated += range(count, len(self._endpoints))  # the fallbacks, in their order
        with self._lock:
            failed = set(self._failed)
        healthy = [i for i in rotated if i not in failed]
        # Healthy base URLs first, then healthy fallbacks: the remaining ranges leave a base
        # URL that failed; it is tried again only when nothing else is left.
        return healthy + [i for i in rotated if i in failed]

    def read_into(self, blob: str, offset: int, buffer: memoryview) -> None:
        if not buffer:
            return
        failures = []
        for index in self._order(blob, offset):
            endpoint = self._endpoints[index]
            try:
                self._read_from(endpoint, blob, offset, buffer)
            except (OSError, http.client.HTTPException) as error:
                self._mark_failed(index, f"{endpoint.base_url}: {error}")
                failures.append(f"{endpoint.base_url}: {error}")
                continue
            if index >= self._primaries:
                with self._lock:
                    self.fallback_reads += 1
            return
        raise SourceError(
            f"blob {blob} bytes {offset}-{offset + len(buffer) - 1}: every cache node failed: "
            + "; ".join(failures)
        )

    def _read_from(self, endpoint: _Endpoint, blob: str, offset: int, buffer: memoryview) -> None:
        connection, reused = endpoint.take()
        try:
            self._request(connection, endpoint, blob, offset, buffer)
        except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
            connection.close()
            if not reused:
                raise
            # A keep-alive connection the server had already closed: retry once on a new one.
            connection = endpoint.connect()
            try:
                self._request(connection, endpoint, blob, offset, buffer)
            except BaseException:
                connection.close()
                raise
        except BaseException:
            connection.close()
            raise
        endpoint.idle.put(connection)

    def _request(
        self,
        connection: http.client.HTTPConnection,
        endpoint: _Endpoint,
        blob: str,
        offset: int,
        buffer: memoryview,
    ) -> None:
        last = offset + len(buffer) - 1
        headers = {**self._headers, "Range": f"bytes={offset}-{last}"}
        connection.request("GET", f"{endpoint.prefix}/v1/blobs/{blob}", headers=headers)
        response = connection.getresponse()
        if response.status != 206:
            response.read(64 * 1024)  # drain a short error body; the connection is dropped
            raise RangeResponseError(
                f"expected 206 for bytes {offset}-{last}, got {response.status}",
                status=response.status,
            )
        content_range = response.getheader("Content-Range", "")
        served = parse_content_range(content_range)
        if served is None or (served.first, served.last) != (offset, last):
            raise RangeResponseError(
                f"asked for bytes {offset}-{last}, got Content-Range {content_range!r}"
            )
        done = 0
        while done < len(buffer):
            count = response.readinto(buffer[done:])
            if not count:
                raise RangeResponseError(
                    f"short body for bytes {offset}-{last}: {done} of {len(buffer)} bytes"
                )
            done += count
        if response.read(1):
            raise RangeResponseError(f"body for bytes {offset}-{last} is longer than asked")

    def close(self) -> None:
        for endpoint in self._endpoints:
            endpoint.close()


def _is_hex(text: str) -> bool:
    return bool(text) and all(c in "0123456789abcdef" for c in text)
