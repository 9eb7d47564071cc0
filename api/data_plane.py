"""The data plane: ``GET /v1/blobs/{sha256}`` served by sendfile from several processes.

The FastAPI route pushes every byte through Python in one process (well under 1 GB/s). Here N
aiohttp worker processes listen on one port (``SO_REUSEPORT``: the kernel spreads connections
over them) and hand each verified range to the kernel with ``sendfile``, so the bytes go from
the page cache to the socket without entering Python. Semantics match the FastAPI route: the
bearer token names the tenant (401 otherwise), a blob is visible only through a pipeline of the
caller's tenant (the admin tenant sees every referenced blob; 404 otherwise), status and
headers come from the same :func:`api.ranges.plan_blob_response` (200, 206 or 416; HEAD), and
the chunks covering a range are checked against their digests before the headers go out: a
mismatch quarantines the blob and answers 502 (I2).

Each worker opens the node's metadata (SQLite, safe across processes) and blob store itself and
only reads them, apart from quarantining a bad blob. A blob is authorised with one read of the
registry's blob index, so a flood of 404s costs no scan. Each worker counts what it serves in
its slot of :mod:`cache_node.worker_stats` (shared memory the node reads for ``/metrics``).
``weightcache serve`` starts and supervises the workers (:mod:`api.data_plane_supervisor`);
``python -m api.data_plane --port P --workers N`` runs them alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Coroutine, Iterator
from typing import Any

from aiohttp import web
from starlette.responses import JSONResponse

from api.data_plane_processes import (
    run_data_plane,
    start_worker,
    stats_dir,
    stop_data_plane,
    wait_ready,
)
from api.errors import bearer_token, error_response, exception_response, http_error_code
from api.ranges import plan_blob_response
from cache_node.access import open_tokens_file
from cache_node.errors import NotFound, Unauthorized, WeightCacheError
from cache_node.events import configure_logging
from cache_node.metadata import DiskcacheKeyValue, KeyValue
from cache_node.region.peer_auth import RegionSecret, is_peer_authorization
from cache_node.registry import Registry
from cache_node.settings import NodeSettings
from cache_node.store import BlobStore, check_sha256
from cache_node.tenants import ADMIN_TENANT, DEFAULT_TENANT
from cache_node.tokens_file import TokensWatcher
from cache_node.worker_stats import WorkerStats

__all__ = [
    "create_app",
    "run_data_plane",
    "start_worker",
    "stats_dir",
    "stop_data_plane",
    "wait_ready",
]

class _CountingMeta:
    """The worker's metadata, counting every record it reads (into its stats slot)."""

    def __init__(self, meta: KeyValue, stats: WorkerStats | None) -> None:
        self._meta = meta
        self._stats = stats

    def _count(self) -> None:
        if self._stats is not None:
            self._stats.add("meta_reads")

    def get(self, key: str) -> dict[str, Any] | None:
        self._count()
        return self._meta.get(key)

    def set(self, key: str, value: dict[str, Any]) -> None:
        self._meta.set(key, value)

    def delete(self, key: str) -> None:
        self._meta.delete(key)

    def scan(self, prefix: str) -> Iterator[tuple[str, dict[str, Any]]]:
        for item in self._meta.scan(prefix):
            self._count()
            yield item

    def close(self) -> None:
        self._meta.close()


class _Plane:
    """What one worker process holds: tokens, metadata, store, registry, counters."""

    def __init__(
        self, settings: NodeSettings, *, slot: int | None = None, tokens: bytes | None = None
    ) -> None:
        self.stats = WorkerStats(stats_dir(settings), slot) if slot is not None else None
        # Followed while the worker runs, like the API's; ``tokens`` is the node's last good
        # config, to start from when the file on disk is bad (a worker restarted meanwhile).
        self.tokens = open_tokens_file(
            settings, process="data_plane", fallback=tokens, on_result=self._tokens_result
        )
        self.tokens_watcher = None
        if self.tokens is not None:
            self._tokens_result(self.tokens.problem is None, count=False)
            self.tokens_watcher = TokensWatcher(
                self.tokens, interval_s=settings.tokens_check_interval_s
            )
        self.meta = DiskcacheKeyValue(settings.data_dir / "meta")
        # a reader: a bad chunk it finds is quarantined by the node, which owns the store
        self.store = BlobStore(
            settings.data_dir, capacity=settings.capacity, meta=self.meta, owner=False
        )
        self.registry = Registry(_CountingMeta(self.meta, self.stats))
        # Region peers read any blob the node holds, by digest (a fill), never as a tenant.
        secret = settings.regional.secret
        self.peers = RegionSecret(secret) if secret is not None else None

    def _tokens_result(self, ok: bool, *, count: bool = True) -> None:
        if self.stats is not None:
            if count:
                self.stats.add("tokens_reloads" if ok else "tokens_reload_failures")
            self.stats.set("tokens_stale", int(not ok))

    def reload_tokens(self) -> None:
        """Re-read the tokens file now (SIGHUP), in the watcher's thread."""
        if self.tokens_watcher is not None:
            self.tokens_watcher.poke()

    def tenant_for(self, authorization: str | None) -> str | None:
        if self.tokens is None:
            return DEFAULT_TENANT
        token = bearer_token(authorization)
        return None if token is None else self.tokens.config.tokens.get(token)

    def allows(self, tenant: str, sha256: str) -> bool:
        """Whether a pipeline of ``tenant`` (any pipeline, for the admin) references the blob:
        one read of the registry's blob index, kept up to date by the node on every save."""
        self.count("blob_lookups")
        tenants = self.registry.blob_tenants(sha256)
        return tenant in tenants or (tenant == ADMIN_TENANT and bool(tenants))

    def count(self, name: str, amount: int = 1) -> None:
        if self.stats is not None:
            self.stats.add(name, amount)


_PLANE = web.AppKey("plane", _Plane)


def create_app(
    settings: NodeSettings, *, slot: int | None = None, tokens: bytes | None = None
) -> web.Application:
    """The aiohttp app of one worker: ``GET|HEAD /v1/blobs/{sha256}`` and ``GET /healthz``.

    ``slot`` names the worker's counters in the stats directory (None: not counted);
    ``tokens``, the bytes of the node's last good tokens file, is used only if the file on
    disk cannot be (see :mod:`cache_node.tokens_file`).
    """
    app = web.Application(middlewares=[_errors])
    plane = _Plane(settings, slot=slot, tokens=tokens)
    app[_PLANE] = plane
    app.router.add_get("/v1/blobs/{sha256}", _get_blob)  # and HEAD
    app.router.add_get("/healthz", _healthz)

    async def watch(_: web.Application) -> None:
        if plane.tokens_watcher is not None:
            plane.tokens_watcher.start()

    async def close(_: web.Application) -> None:
        if plane.tokens_watcher is not None:
            plane.tokens_watcher.stop()
        plane.meta.close()
        if plane.stats is not None:
            plane.stats.close()

    app.on_startup.append(watch)
    app.on_cleanup.append(close)
    return app


async def _healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def _get_blob(request: web.Request) -> web.StreamResponse:
    """The blob's bytes, 200 or 206, sent from the page cache by the kernel."""
    plane = request.app[_PLANE]
    authorization = request.headers.get("Authorization")
    sha256 = check_sha256(request.match_info["sha256"])
    if is_peer_authorization(authorization):
        if plane.peers is None:
            raise Unauthorized("this node is not in a region: no peer requests",
                               reason="no_region")
        plane.peers.authenticate(authorization)  # then any held blob (store.open: 404)
    else:
        tenant = plane.tenant_for(authorization)
        if tenant is None:
            raise Unauthorized("missing or invalid bearer token")
        if not await asyncio.to_thread(plane.allows, tenant, sha256):
            raise NotFound(f"no blob {sha256}")
    record, handle = await asyncio.to_thread(plane.store.open, sha256)
    with handle:
        answer = plan_blob_response(
            method=request.method,
            range_fields=request.headers.getall("Range", []),
            if_range=request.headers.get("If-Range"),
            sha256=sha256,
            size=record.size,
        )
        if answer.status == 416:
            return _error(416, "range_not_satisfiable", "range outside the blob",
                          headers=answer.headers)
        start, end = answer.start, answer.end
        if answer.send_body:
            # Before any header: a mismatch quarantines the blob and becomes a 502 (I2).
            verify = asyncio.to_thread(plane.store.verify_range, record, handle, start, end)
            await _until_done(verify)
        response = web.StreamResponse(status=answer.status, headers=answer.headers)
        response.content_type = "application/octet-stream"
        response.content_length = end - start
        await response.prepare(request)  # sends the headers now, ahead of the file bytes
        if answer.send_body and end > start:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client went away")
            sent = await asyncio.get_running_loop().sendfile(transport, handle, start, end - start)
            plane.count("bytes_served", sent)
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
    plane = request.app[_PLANE]
    plane.count("requests")
    response = await _answer(request, handler)
    if 2 <= response.status // 100 <= 5 and response.status // 100 != 3:
        plane.count(f"responses_{response.status // 100}xx")
    return response


async def _answer(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        response: web.StreamResponse = await handler(request)
        return response
    except WeightCacheError as exc:
        return _from_api(exception_response(exc))
    except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method
        if exc.status < 400:
            raise
        return _error(exc.status, http_error_code(exc.status), exc.reason)


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    response = _from_api(error_response(status, code, message))
    response.headers.update(headers or {})
    return response


def _from_api(answer: JSONResponse) -> web.Response:
    """The API's error answer, byte for byte (body, Content-Length and headers), on aiohttp."""
    headers = {k: v for k, v in answer.headers.items() if k.lower() != "content-length"}
    return web.Response(body=bytes(answer.body), status=answer.status_code, headers=headers)


async def _serve(
    settings: NodeSettings, *, port: int, slot: int | None, tokens: bytes | None = None
) -> None:
    """One worker: listen (sharing the port), say "ready" on stdout, serve until told to stop.

    ``SIGHUP`` re-reads the tokens file. Every handler is in place before "ready", so a
    signal the supervisor forwards never finds a worker that would die of it.
    """
    parent = os.getppid()
    app = create_app(settings, slot=slot, tokens=tokens)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        loop.add_signal_handler(signal.SIGHUP, app[_PLANE].reload_tokens)
        try:
            await web.TCPSite(runner, settings.host, port, reuse_port=True, backlog=1024).start()
        except OSError as exc:
            print(f"cannot listen on {settings.host}:{port}: {exc}", flush=True)
            return
        print("ready", flush=True)
        # A worker never outlives the process that started it (not even one killed with -9).
        while not stop.is_set() and os.getppid() == parent:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """``python -m api.data_plane``: the data plane alone, settings from the environment.

    ``--worker`` runs one worker process in the foreground (what ``run_data_plane`` starts);
    without it, ``--workers`` of them run under a supervisor that restarts any that dies.
    """
    parser = argparse.ArgumentParser(prog="python -m api.data_plane")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--host", default=None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--capacity", default=None)
    parser.add_argument("--tokens", dest="tokens_file", default=None)
    parser.add_argument("--tokens-check-interval", dest="tokens_check_interval_s", type=float,
                        default=None)
    parser.add_argument("--log-format", choices=("text", "json"), default=None)
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--slot", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tokens-fallback-stdin", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.log_format is not None:
        configure_logging(args.log_format)
    overrides = {
        name: value
        for name in ("data_dir", "host", "capacity", "tokens_file", "tokens_check_interval_s")
        if (value := getattr(args, name)) is not None
    }
    settings = NodeSettings(**overrides)
    if args.worker:
        fallback = sys.stdin.buffer.read() if args.tokens_fallback_stdin else None
        asyncio.run(_serve(settings, port=args.port, slot=args.slot, tokens=fallback or None))
        return 0
    from api.data_plane_supervisor import DataPlane

    plane = DataPlane(
        settings, port=args.port, workers=args.workers, log_format=args.log_format
    ).start()
    signal.signal(signal.SIGHUP, lambda *_: plane.reload_tokens())
    print(f"data plane: {args.workers} workers on http://{settings.host}:{args.port}",
          file=sys.stderr)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        plane.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
