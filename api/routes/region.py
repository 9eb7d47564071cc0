"""``GET /v1/region``: the region's live nodes, and on how many of them each of the caller's
pipelines is whole (an extension of the contract). A node without ``--redis`` answers as a
region of one node (``connected: false``), so clients need no special case."""

from __future__ import annotations

from fastapi import APIRouter

from api.deps import Node, Tenant
from api.schema import RegionInfo
from cache_node.region.node_region import single_node_info

router = APIRouter(tags=["region"])


@router.get("/v1/region", response_model=RegionInfo)
async def region_info(node: Node, tenant: Tenant) -> RegionInfo:
    """Nodes with state, capacity and load; ``copies`` per pipeline the caller sees."""
    if node.region is None:
        return await single_node_info(node, tenant)
    return await node.region.info(tenant)
