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
    ``warnings`` (same shape, from ``app.state.readiness_warnings``) name what an operator
    should fix while the node keeps serving, such as a tokens file that does not parse
    (``tokens_file_invalid``); the key is there only when there are some.
    """
    checks: list[Callable[[], dict[str, Any] | None]] = request.app.state.readiness_checks
    warn: list[Callable[[], dict[str, Any] | None]] = request.app.state.readiness_warnings
    reasons = [
        {"code": code, "message": _READINESS_MESSAGES.get(code, code)}
        for code in await anyio.to_thread.run_sync(node.readiness_problems)
    ]
    reasons += [reason for check in checks if (reason := check()) is not None]
    warnings = await anyio.to_thread.run_sync(  # they may read files
        lambda: [w for check in warn if (w := check()) is not None]
    )
    body: dict[str, Any] = {"node_id": node.settings.node_id}
    if warnings:
        body["warnings"] = warnings
    if reasons:
        return JSONResponse({"status": "degraded", **body, "reasons": reasons}, status_code=503)
    return {"status": "ready", **body}


@router.get("/metrics")
def metrics(node: Node) -> Response:
    node.refresh_gauges()  # reads every record: in a worker thread, as a plain def
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
