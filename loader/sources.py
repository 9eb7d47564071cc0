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
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from clients.client import auth_headers
from loader.content_range import parse_content_range
from loader.errors import IntegrityError, RangeResponseError, SourceError
from loader.preads import read_into_at

__all__ = ["Check", "HttpRangeSource", "LocalFileSource", "RoutingSource", "Source", "blob_path"]

log = logging.getLogger("weightcache.loader")


#: Checks the bytes a read delivered (a chunk's digest): raises IntegrityError when they are
#: wrong. A source that can read the range elsewhere does so; the others let the error go.
Check = Callable[[memoryview], None]


class Source(Protocol):
    """Something that can fill buffers with blob bytes, from many threads at once."""

    def prepare(self, blobs: Iterable[str]) -> None:
        """Open what the reads of ``blobs`` need (files, connections); timed as 'connect'."""

    def read_into(
        self, blob: str, offset: int, buffer: memoryview, *, check: Check | None = None
    ) -> None:
        """Fill ``buffer`` with the bytes at ``offset`` of ``blob`` that pass ``check``, or
        raise SourceError (or the check's IntegrityError)."""

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

    def read_into(
        self, blob: str, offset: int, buffer: memoryview, *, check: Check | None = None
    ) -> None:
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
        if check is not None:  # one copy here: a bad one is an error, nothing to re-read
            check(buffer)

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

    def read_into(
        self, blob: str, offset: int, buffer: memoryview, *, check: Check | None = None
    ) -> None:
        if blob in self._local_blobs:
            self.local.read_into(blob, offset, buffer, check=check)
        elif self.remote is not None:
            self.remote.read_into(blob, offset, buffer, check=check)
        else:
            raise SourceError(f"blob {blob} is not in {self.local.data_dir}")

    def close(self) -> None:
        self.local.close()
        if self.remote is not None:
            self.remote.close()


class _Endpoint:
    """One node's base URL, its idle keep-alive connections, and what this load got from it.

    The counters are guarded by the owning source's lock.
    """

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
        self.in_flight = 0  # requests being read from it now
        self.bytes_served = 0
        self.down = False  # failed as a whole: tried again only when nothing else is left
        self.missing: set[str] = set()  # blobs it refused (4xx): skipped for those blobs only
        self.first_failure: str | None = None

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
    """Parallel HTTP range requests to ``GET {base}/v1/blobs/{sha256}`` over a region's nodes.

    Where the ranges of a blob go, in order of preference:

    1. ``holders[blob]`` (the manifest's ``nodes``: the region's nodes that hold the blob), or
       ``base_urls`` for a blob with no holders listed. Each range goes to the one with the
       fewest requests in flight from this source (ties broken by blob and offset), so one load
       spreads over every holder, a slower node gets fewer ranges, and many replicas, each
       balancing its own requests, spread over the whole region;
    2. then ``base_urls`` (the answering node's data plane) and ``fallback_urls`` (its API), in
       that order;
    3. nodes that failed, last.

    When a read fails (refused, reset, 5xx, a wrong ``Content-Range``, a short body) the same
    range is asked of the next node: a node that dies mid-load costs only the ranges it had in
    flight, re-read elsewhere, and it leaves the rotation for the rest of the load. A node that
    sends nothing for ``timeout`` seconds (a host gone without closing its connections) has
    failed that read: the stall costs one timeout, not the load. A 4xx answer
    (the node does not hold the blob, or refuses it) or bytes that fail the read's ``check``
    (a bad copy of the blob) leave the rotation for that blob only; when every node failed and
    one of them sent bad bytes, the check's IntegrityError is raised, not a SourceError.
    Every failover is logged with the nodes involved and the reason; ``bytes_by_node()``,
    ``failed_nodes()`` and ``failovers`` say what happened. ``fallback_reads`` counts the
    ranges the ``fallback_urls`` served and ``fallback_reason`` says why they were needed.

    The bytes are checked the same way whichever node sent them (status, ``Content-Range``,
    length; the chunk digests by the stream when verifying). Every node gets the same
    ``Authorization``: a region shares one tokens file. Each thread borrows a keep-alive
    connection and reads the body with ``readinto`` straight into the caller's buffer.
    """

    def __init__(
        self,
        base_urls: Sequence[str],
        *,
        token: str | None = None,
        timeout: float = 15.0,
        connections: int = 8,
        fallback_urls: Sequence[str] = (),
        holders: Mapping[str, Sequence[str]] | None = None,
    ) -> None:
        if not base_urls:
            raise ValueError("at least one base URL is needed")
        self._timeout = timeout
        self._endpoints: dict[str, _Endpoint] = {}
        self._base = self._register(base_urls)
        self._fallbacks = [e for e in self._register(fallback_urls) if e not in self._base]
        self._holders = {blob: self._register(urls) for blob, urls in (holders or {}).items()}
        self._headers = auth_headers(token)
        self._connections = connections
        self._lock = threading.Lock()
        self.failovers = 0
        self.fallback_reads = 0
        self.fallback_reason: str | None = None

    def _register(self, urls: Iterable[str]) -> list[_Endpoint]:
        """One endpoint per distinct URL, shared by every blob that names it."""
        found: list[_Endpoint] = []
        for url in urls:
            key = url.rstrip("/")
            endpoint = self._endpoints.get(key)
            if endpoint is None:
                endpoint = self._endpoints[key] = _Endpoint(key, timeout=self._timeout)
            if endpoint not in found:
                found.append(endpoint)
        return found

    def _route(self, blob: str) -> tuple[list[_Endpoint], list[_Endpoint]]:
        """The endpoints a blob's ranges are spread over, and those tried after them, in order."""
        spread = self._holders.get(blob) or self._base
        return spread, [e for e in (*self._base, *self._fallbacks) if e not in spread]

    def prepare(self, blobs: Iterable[str]) -> None:
        # Open keep-alive connections to the nodes the reads will spread over up front, so
        # that 'connect' is measured on its own and the first reads do not queue on handshakes.
        spread: list[_Endpoint] = []
        later: list[_Endpoint] = []
        routes = [self._route(blob) for blob in blobs] or [(self._base, self._fallbacks)]
        for first, rest in routes:
            spread += [e for e in first if e not in spread]
            later += [e for e in rest if e not in later]
        each = max(2, -(-self._connections // len(spread)))
        reached = [e for e in spread if self._open(e, each)]
        if reached:
            return
        # None of them answers: the rest, in order, until one does (as the reads would).
        for endpoint in later:
            if endpoint not in spread and self._open(endpoint, self._connections):
                return
        raise SourceError(
            "no cache node reachable: " + ", ".join(e.base_url for e in self._endpoints.values())
        )

    def _open(self, endpoint: _Endpoint, count: int) -> bool:
        try:
            for _ in range(count):
                endpoint.idle.put(endpoint.connect())
        except OSError as error:
            self._fail(endpoint, None, error)
            log.warning("cache node %s is unreachable (%s): its ranges go to the others",
                        endpoint.base_url, error)
            return False
        return True

    def _next(self, blob: str, offset: int, tried: Sequence[_Endpoint]) -> _Endpoint | None:
        """The endpoint to read this range from next (counted in flight), or None: all tried."""
        spread, rest = self._route(blob)
        order = [*spread, *rest]
        tie = zlib.crc32(f"{blob}:{offset}".encode())
        with self._lock:
            candidates = []
            for position, endpoint in enumerate(order):
                if endpoint in tried:
                    continue
                if endpoint.down or blob in endpoint.missing:
                    key = (2, 0, position)
                elif position < len(spread):
                    key = (0, endpoint.in_flight, (position + tie) % len(spread))
                else:
                    key = (1, 0, position)
                candidates.append((key, position))
            if not candidates:
                return None
            chosen = order[min(candidates)[1]]
            chosen.in_flight += 1
            return chosen

    def _fail(self, endpoint: _Endpoint, blob: str | None, error: BaseException) -> str:
        """Take ``endpoint`` out of the rotation (for ``blob`` only on a 4xx); the reason."""
        status = error.details.get("status") if isinstance(error, RangeResponseError) else None
        bad_copy = isinstance(error, IntegrityError)
        refused = blob if bad_copy or (isinstance(status, int) and 400 <= status < 500) else None
        reason = f"{endpoint.base_url}: {error}"
        with self._lock:
            if refused is not None:
                endpoint.missing.add(refused)
            else:
                endpoint.down = True
            if endpoint.first_failure is None:
                endpoint.first_failure = f"blob {refused}: {error}" if refused else str(error)
            if endpoint not in self._fallbacks and self.fallback_reason is None:
                self.fallback_reason = reason
        return reason

    def read_into(
        self, blob: str, offset: int, buffer: memoryview, *, check: Check | None = None
    ) -> None:
        if not buffer:
            return
        tried: list[_Endpoint] = []
        failures: list[str] = []
        bad_copy: IntegrityError | None = None
        while (endpoint := self._next(blob, offset, tried)) is not None:
            tried.append(endpoint)
            try:
                self._read_from(endpoint, blob, offset, buffer)
                if check is not None:
                    check(buffer)
            except IntegrityError as error:
                bad_copy = bad_copy or error
                failures.append(self._fail(endpoint, blob, error))
                continue
            except (OSError, http.client.HTTPException) as error:
                failures.append(self._fail(endpoint, blob, error))
                continue
            finally:
                with self._lock:
                    endpoint.in_flight -= 1
            with self._lock:
                endpoint.bytes_served += len(buffer)
                if endpoint in self._fallbacks:
                    self.fallback_reads += 1
                if failures:
                    self.failovers += 1
            if failures:
                # Never a silent change of node: each range re-read elsewhere says so.
                log.warning("blob %s bytes %d-%d re-read from %s after %s", blob, offset,
                            offset + len(buffer) - 1, endpoint.base_url, "; ".join(failures))
            return
        message = (f"blob {blob} bytes {offset}-{offset + len(buffer) - 1}: every cache node "
                   "failed: " + "; ".join(failures))
        if bad_copy is not None:  # bytes came, and were wrong: an integrity failure
            raise IntegrityError(message, **bad_copy.details)
        raise SourceError(message)

    def bytes_by_node(self) -> dict[str, int]:
        """Bytes each node served to this source (whole digest chunks when verifying)."""
        with self._lock:
            return {e.base_url: e.bytes_served for e in self._endpoints.values() if e.bytes_served}

    def failed_nodes(self) -> dict[str, str]:
        """Each node that failed a read, with its first failure."""
        with self._lock:
            return {
                e.base_url: e.first_failure
                for e in self._endpoints.values()
                if e.first_failure is not None
            }

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
        for endpoint in self._endpoints.values():
            endpoint.close()

