"""Node information, health, readiness and Prometheus metrics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from api.deps import Node, Tenant
from api.schema import NodeInfo

router = APIRouter(tags=["node"])


@router.get("/v1/node", response_model=NodeInfo)
async def node_info(node: Node, tenant: Tenant) -> NodeInfo:
    return node.node_info()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request, node: Node) -> dict[str, Any] | JSONResponse:
    """200 when the node can take traffic; 503 with every reason it cannot otherwise.

    The reasons come from ``app.state.readiness_checks`` (callables returning None or a
    ``{"code", "message"}`` dict), so each part of the node adds its own.
    """
    checks: list[Callable[[], dict[str, Any] | None]] = request.app.state.readiness_checks
    reasons = [reason for check in checks if (reason := check()) is not None]
    if reasons:
        body = {"status": "not_ready", "node_id": node.settings.node_id, "reasons": reasons}
        return JSONResponse(body, status_code=503)
    return {"status": "ready", "node_id": node.settings.node_id}


@router.get("/metrics")
async def metrics(node: Node) -> Response:
    node.refresh_gauges()
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
