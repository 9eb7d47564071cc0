"""Dependencies shared by the routers: the node, and the caller's tenant."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from api.errors import bearer_token
from api.schema import validate_identifier
from cache_node.errors import InvalidInput, Unauthorized
from cache_node.node import CacheNode
from cache_node.region.peer_auth import Peer, is_peer_authorization

#: ``?tenant=``: the admin names whose pipelines a request acts on.
ActingTenant = Annotated[
    str | None, Query(max_length=256, description="admin only: act on this tenant's pipelines")
]


def get_node(request: Request) -> CacheNode:
    node: CacheNode = request.app.state.node
    return node


def get_tenant(
    request: Request,
    node: Annotated[CacheNode, Depends(get_node)],
    tenant: ActingTenant = None,
) -> str:
    """The tenant a request acts for: the caller's, from ``Authorization: Bearer`` (401 when
    missing or unknown), or for admin the one ``?tenant=`` names (404 for anyone else)."""
    caller = node.tenant_for(bearer_token(request.headers.get("authorization")))
    if caller is None:
        raise Unauthorized("missing or invalid bearer token")
    return node.access.acting_tenant(caller, tenant)


def get_blob_reader(
    request: Request,
    node: Annotated[CacheNode, Depends(get_node)],
    tenant: ActingTenant = None,
) -> str | Peer:
    """Who reads a blob: a tenant (as :func:`get_tenant`), or a peer node of the region
    (``Authorization: WeightcacheNode ...``, the region secret; 401 otherwise). A peer is
    never a tenant: it reads blobs by digest for a fill, and nothing else."""
    header = request.headers.get("authorization")
    if not is_peer_authorization(header):
        return get_tenant(request, node, tenant)
    if node.region is None:
        raise Unauthorized("this node is not in a region: no peer requests", reason="no_region")
    return node.region.secret.authenticate(header)


def pipeline_id(pipeline_id: Annotated[str, Path(max_length=256)]) -> str:
    try:
        return validate_identifier(pipeline_id)
    except ValueError as exc:
        raise InvalidInput(str(exc), field="id") from None


Node = Annotated[CacheNode, Depends(get_node)]
Tenant = Annotated[str, Depends(get_tenant)]
BlobReader = Annotated[str | Peer, Depends(get_blob_reader)]
PipelineId = Annotated[str, Depends(pipeline_id)]
