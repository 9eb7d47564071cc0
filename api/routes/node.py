"""Node information, health, readiness and Prometheus metrics."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response
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
async def readyz(node: Node) -> dict[str, object] | JSONResponse:
    """200 ready, or 503 ``{"status": "degraded", "reasons": [...]}`` (e.g. ``disk_full``)."""
    reasons = await anyio.to_thread.run_sync(node.readiness_problems)
    if reasons:
        return JSONResponse(
            {"status": "degraded", "reasons": reasons, "node_id": node.settings.node_id},
            status_code=503,
        )
    return {"status": "ready", "node_id": node.settings.node_id}


@router.get("/metrics")
async def metrics(node: Node) -> Response:
    node.refresh_gauges()
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
