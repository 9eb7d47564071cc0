"""``create_app(settings)``: the FastAPI app of one cache node."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api.errors import install_error_handlers
from api.routes import blobs, dashboard, loads, pipelines, replicas
from api.routes import node as node_routes
from cache_node.node import VERSION, CacheNode
from cache_node.settings import NodeSettings


def create_app(settings: NodeSettings, *, node: CacheNode | None = None) -> FastAPI:
    """The app; the node starts (reconcile, resume warm jobs) with the app's lifespan."""
    cache_node = node or CacheNode(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await cache_node.start()
        try:
            yield
        finally:
            await cache_node.stop()

    app = FastAPI(title="weightcache", version=VERSION, lifespan=lifespan)
    app.state.node = cache_node
    app.state.load_history = cache_node.load_history
    install_error_handlers(app)
    for router in (
        pipelines.router,
        replicas.router,
        blobs.router,
        node_routes.router,
        loads.router,
        dashboard.router,
    ):
        app.include_router(router)
    return app
