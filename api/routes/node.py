"""Node information, health, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api import views
from api.deps import Node, Tenant
from api.schema import NodeInfo

router = APIRouter(tags=["node"])


@router.get("/v1/node", response_model=NodeInfo)
def node_info(node: Node, tenant: Tenant) -> NodeInfo:
    return views.node_info(node)


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


_READINESS_MESSAGES = {
    "disk_full": "the data dir's filesystem is full: fills fail with insufficient_storage "
    "until space is freed (delete or evict pipelines, or free the disk)",
}


@router.get("/readyz", response_model=None)
async def readyz(request: Request, node: Node) -> dict[str, Any] | JSONResponse:
    """200 when the node can take traffic; 503 ``{"status": "degraded", "reasons": [...]}``
    naming every reason it cannot (``disk_full``, ``data_plane_down``, ...).

    The reasons come from the node itself (its disk) and from ``app.state.readiness_checks``
    (callables returning None or a ``{"code", "message"}`` dict), so each part adds its own.
    """
    checks: list[Callable[[], dict[str, Any] | None]] = request.app.state.readiness_checks
    reasons = [
        {"code": code, "message": _READINESS_MESSAGES.get(code, code)}
        for code in await anyio.to_thread.run_sync(node.readiness_problems)
    ]
    reasons += [reason for check in checks if (reason := check()) is not None]
    if reasons:
        body = {"status": "degraded", "node_id": node.settings.node_id, "reasons": reasons}
        return JSONResponse(body, status_code=503)
    return {"status": "ready", "node_id": node.settings.node_id}


@router.get("/metrics")
def metrics(node: Node) -> Response:
    node.refresh_gauges()  # reads every record: in a worker thread, as a plain def
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
