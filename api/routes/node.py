"""Node information, health, readiness and Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter, Response
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


@router.get("/readyz")
async def readyz(node: Node) -> dict[str, str]:
    return {"status": "ready", "node_id": node.settings.node_id}


@router.get("/metrics")
async def metrics(node: Node) -> Response:
    node.refresh_gauges()
    return Response(generate_latest(node.metrics.registry), media_type=CONTENT_TYPE_LATEST)
