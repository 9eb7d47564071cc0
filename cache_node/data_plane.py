"""The data plane: ``GET /v1/blobs/{sha256}`` served by sendfile from several processes.

The FastAPI route pushes every byte through Python in one process (well under 1 GB/s). Here N
aiohttp worker processes listen on one port (``SO_REUSEPORT``: the kernel spreads connections
over them) and hand each verified range to the kernel with ``sendfile``, so the bytes go from
the page cache to the socket without entering Python. Semantics match the FastAPI route: the
bearer token names the tenant (401 otherwise), a blob is visible only through a pipeline of the
caller's tenant (the admin tenant sees every referenced blob; 404 otherwise), ``Range`` gives
206 with ``Content-Range`` or 416, and the chunks covering a range are checked against their
digests before the headers go out: a mismatch quarantines the blob and answers 502 (I2).

Each worker opens the node's metadata (SQLite, safe across processes) and blob store itself and
only reads them, apart from quarantining a bad blob. ``weightcache serve`` starts it beside the
API; ``python -m cache_node.data_plane --port P --workers N`` runs it alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any

from aiohttp import web

from api.ranges import RangeNotSatisfiable, parse_range
from cache_node.errors import NotFound, Unauthorized, WeightCacheError
from cache_node.metadata import DiskcacheKeyValue
from cache_node.registry import Registry
from cache_node.settings import NodeSettings
from cache_node.store import BlobStore, check_sha256
from cache_node.tenants import ADMIN_TENANT, DEFAULT_TENANT

__all__ = ["BlobIndex", "create_app", "run_data_plane", "stop_data_plane"]

#: How stale the tenant → blobs index may get (a deleted pipeline stops granting access then).
INDEX_MAX_AGE_S = 5.0
_START_TIMEOUT_S = 60.0


class BlobIndex:
    """Which tenants' pipelines reference each blob, cached per process.

    Rebuilt when older than ``max_age_s`` and whenever a lookup misses, so a pipeline registered
    a moment ago is served at once; concurrent misses share one rebuild.
    """

    def __init__(self, registry: Registry, *, max_age_s: float = INDEX_MAX_AGE_S) -> None:
        self.registry = registry
        self.max_age_s = max_age_s
        self._tenants: dict[str, set[str]] = {}
        self._built_at = -math.inf  # monotonic time the last scan started
        self._lock = asyncio.Lock()

    async def allows(self, tenant: str, sha256: str) -> bool:
        """Whether a pipeline of ``tenant`` (any pipeline, for the admin) references the blob."""
        asked_at = time.monotonic()
        if asked_at - self._built_at > self.max_age_s:
            await self._rebuild(asked_at)
        if self._allowed(tenant, sha256):
            return True
        await self._rebuild(asked_at)
        return self._allowed(tenant, sha256)

    def _allowed(self, tenant: str, sha256: str) -> bool:
        tenants = self._tenants.get(sha256, set())
        return tenant in tenants or (tenant == ADMIN_TENANT and bool(tenants))

    async def _rebuild(self, asked_at: float) -> None:
        async with self._lock:
            if self._built_at >= asked_at:
                return  # a scan that started after this request already ran
            started = time.monotonic()
            self._tenants = await asyncio.to_thread(self._scan)
            self._built_at = started

    def _scan(self) -> dict[str, set[str]]:
        index: dict[str, set[str]] = {}
        for record in self.registry.all():
            for sha256 in record.blobs():
                index.setdefault(sha256, set()).add(record.tenant)
        return index


class _Plane:
    """What one worker process holds: tokens, metadata, store, index."""

    def __init__(self, settings: NodeSettings) -> None:
        self.tokens = settings.load_tokens()
        self.meta = DiskcacheKeyValue(settings.data_dir / "meta")
        self.store = BlobStore(settings.data_dir, capacity=settings.capacity, meta=self.meta)
        self.index = BlobIndex(Registry(self.meta))

    def tenant_for(self, authorization: str | None) -> str | None:
        if self.tokens is None:
            return DEFAULT_TENANT
        scheme, _, value = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return self.tokens.get(value.strip())


_PLANE = web.AppKey("plane", _Plane)


def create_app(settings: NodeSettings) -> web.Application:
    """The aiohttp app of one worker: ``GET /v1/blobs/{sha256}`` and ``GET /healthz``."""
    app = web.Application(middlewares=[_errors])
    plane = _Plane(settings)
    app[_PLANE] = plane
    app.router.add_get("/v1/blobs/{sha256}", _get_blob)
    app.router.add_get("/healthz", _healthz)

    async def close(_: web.Application) -> None:
        plane.meta.close()

    app.on_cleanup.append(close)
    return app


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _get_blob(request: web.Request) -> web.StreamResponse:
    """The blob's bytes, 200 or 206, sent from the page cache by the kernel."""
    plane = request.app[_PLANE]
    tenant = plane.tenant_for(request.headers.get("Authorization"))
    if tenant is None:
        raise Unauthorized("missing or invalid bearer token")
    sha256 = check_sha256(request.match_info["sha256"])
    if not await plane.index.allows(tenant, sha256):
        raise NotFound(f"no blob {sha256}")
    record, handle = await asyncio.to_thread(plane.store.open, sha256)
    with handle:
        headers = {"ETag": f'"{sha256}"', "Accept-Ranges": "bytes"}
        try:
            span = parse_range(request.headers.get("Range"), record.size)
        except RangeNotSatisfiable:
            headers["Content-Range"] = f"bytes */{record.size}"
            return _error(416, "range_not_satisfiable", "range outside the blob", headers=headers)
        start, end = span if span is not None else (0, record.size)
        if span is not None:
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.size}"
        send = request.method != "HEAD"
        if send:
            # Before any header: a mismatch quarantines the blob and becomes a 502 (I2).
            verify = asyncio.to_thread(plane.store.verify_range, record, handle, start, end)
            await _until_done(verify)
        response = web.StreamResponse(status=206 if span is not None else 200, headers=headers)
        response.content_type = "application/octet-stream"
        response.content_length = end - start
        await response.prepare(request)  # sends the headers now, ahead of the file bytes
        if send and end > start:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            await asyncio.get_running_loop().sendfile(transport, handle, start, end - start)
        await response.write_eof()
        return response


async def _until_done(work: Coroutine[Any, Any, None]) -> None:
    """Await ``work``; if cancelled, still let it finish before the cancellation goes on.

    The hashing thread reads the handle's file descriptor: closing it under the thread could let
    the number be reused by another file, whose bytes would then fail the check (a false 502).
    """
    task = asyncio.ensure_future(work)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait([task])
        task.exception()  # looked at: the request is gone whatever the outcome
        raise


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal as ``{"error": {"code", "message", ...}}``, like the API's."""
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except WeightCacheError as exc:
        headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else None
        return _error(exc.http_status, exc.code, exc.message, headers=headers, **exc.details)
    except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method
        if exc.status < 400:
            raise
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        return _error(exc.status, code, exc.reason)


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None, **details: Any
) -> web.Response:
    body = {"error": {"code": code, "message": message, **details}}
    return web.json_response(body, status=status, headers=headers)


# --------------------------------------------------------------------------- processes
def run_data_plane(
    settings: NodeSettings, *, port: int, workers: int
) -> list[subprocess.Popen[bytes]]:
    """Start ``workers`` processes serving on ``settings.host:port``; return once all listen.

    Each is ``python -m cache_node.data_plane --worker ...`` (a fresh interpreter: nothing of
    the caller's threads, event loop or main module comes along). Raises RuntimeError, after
    stopping the others, when a worker cannot start (say the port belongs to something else).
    """
    if workers < 1 or not 0 < port < 65536:
        raise ValueError("the data plane needs a port and at least one worker")
    _check_port_free(settings.host, port)
    command = [
        sys.executable, "-m", "cache_node.data_plane", "--worker",
        "--data-dir", str(settings.data_dir),
        "--host", settings.host,
        "--port", str(port),
        "--capacity", str(settings.capacity),
    ]
    if settings.tokens_file is not None:
        command += ["--tokens", str(settings.tokens_file)]
    processes = [subprocess.Popen(command, stdout=subprocess.PIPE) for _ in range(workers)]
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        for process in processes:
            assert process.stdout is not None
            with process.stdout:  # the worker writes one line: "ready", or why it is not
                readable, _, _ = select.select([process.stdout], [], [], _remaining(deadline))
                line = process.stdout.readline().decode().strip() if readable else "timed out"
            if line != "ready":
                raise RuntimeError(f"data plane worker did not start: {line or 'it exited'}")
    except BaseException:
        stop_data_plane(processes)
        raise
    return processes


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port something listens on: workers of another data plane (say another node's,
    on the same port by mistake) would otherwise join the SO_REUSEPORT group and share it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers do
        try:
            probe.bind(address)
        except OSError as exc:
            raise RuntimeError(f"cannot serve the data plane on {host}:{port}: {exc}") from None


def stop_data_plane(
    processes: list[subprocess.Popen[bytes]], *, timeout_s: float = 10.0
) -> None:
    """Ask every worker to finish (SIGTERM), then kill the ones still running."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(_remaining(deadline))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())


async def _serve(settings: NodeSettings, *, port: int) -> None:
    """One worker: listen (sharing the port), say "ready" on stdout, serve until told to stop."""
    parent = os.getppid()
    runner = web.AppRunner(create_app(settings), access_log=None)
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, settings.host, port, reuse_port=True, backlog=1024).start()
        except OSError as exc:
            print(f"cannot listen on {settings.host}:{port}: {exc}", flush=True)
            return
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        # A worker never outlives the process that started it (not even one killed with -9).
        while not stop.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -m cache_node.data_plane``: the data plane alone, settings from the environment.

    ``--worker`` runs one worker process in the foreground (what ``run_data_plane`` starts).
    """
    parser = argparse.ArgumentParser(prog="python -m cache_node.data_plane")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity", default=None)
    parser.add_argument("--tokens", dest="tokens_file", default=None)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    overrides = {
        name: value
        for name in ("data_dir", "host", "capacity", "tokens_file")
        if (value := getattr(args, name)) is not None
    }
    settings = NodeSettings(**overrides)
    if args.worker:
        asyncio.run(_serve(settings, port=args.port))
        return 0
    processes = run_data_plane(settings, port=args.port, workers=args.workers)
    print(f"data plane: {args.workers} workers on http://{settings.host}:{args.port}",
          file=sys.stderr)
    try:
        for process in processes:
            process.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_data_plane(processes)
    return 0


if __name__ == "__main__":
    sys.exit(main())
