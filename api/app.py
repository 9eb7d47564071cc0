"""``create_app(settings)``: the FastAPI app of one cache node."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.blob_stream import StreamSlots
from api.data_plane import stats_dir
from api.data_plane_supervisor import DataPlane, DataPlaneCollector
from api.errors import install_error_handlers
from api.routes import blobs, captures, dashboard, loads, pipelines, region, replicas
from api.routes import node as node_routes
from cache_node.node import VERSION, CacheNode
from cache_node.settings import NodeSettings
from cache_node.tokens_file import TokensCollector, TokensWatcher, tokens_warning


def create_app(
    settings: NodeSettings,
    *,
    node: CacheNode | None = None,
    data_plane: DataPlane | None = None,
) -> FastAPI:
    """The app; the node starts (reconcile, resume warm jobs) with the app's lifespan.

    ``data_plane``, the supervised workers ``serve`` started, joins ``/readyz`` and
    ``/metrics``; the data plane's byte counters are in ``/metrics`` either way.
    With a tokens file, ``app.state.tokens_watcher`` re-reads it while the app runs (its
    ``poke()`` makes it re-read at once: ``serve`` calls it on SIGHUP).
    """
    cache_node = node or CacheNode(settings)
    tokens = cache_node.access.file
    watcher = None
    if tokens is not None:
        watcher = TokensWatcher(tokens, interval_s=settings.tokens_check_interval_s)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await cache_node.start()
        if watcher is not None:
            watcher.start()
        try:
            yield
        finally:
            if watcher is not None:
                watcher.stop()
            await cache_node.stop()

    app = FastAPI(title="weightcache", version=VERSION, lifespan=lifespan)
    app.state.node = cache_node
    app.state.load_history = cache_node.load_history
    app.state.blob_streams = StreamSlots(settings.limits, cache_node.metrics)
    app.state.tokens_watcher = watcher
    #: Each returns None, or why the node should not take traffic ({"code", "message"}).
    app.state.readiness_checks = []
    #: Each returns None, or what an operator should fix while the node keeps serving.
    app.state.readiness_warnings = [lambda: tokens_warning(tokens, stats_dir(settings))]
    with contextlib.suppress(ValueError):  # already registered: an app made twice for a node
        cache_node.metrics.registry.register(DataPlaneCollector(settings, data_plane))
        cache_node.metrics.registry.register(TokensCollector(tokens, stats_dir(settings)))
    if data_plane is not None:
        app.state.readiness_checks.append(data_plane.readiness)
    if cache_node.region is not None:  # region_unreachable while Redis is down
        app.state.readiness_checks.append(cache_node.region.readiness_check)
    install_error_handlers(app)
    for router in (
        pipelines.router,
        replicas.router,
        blobs.router,
        node_routes.router,
        region.router,
        loads.router,
        captures.router,
        dashboard.router,
    ):
        app.include_router(router)
    return app
