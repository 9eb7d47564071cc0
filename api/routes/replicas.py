"""What a replica uses: manifests and leases.

Every handler is a plain ``def``: FastAPI runs it in a worker thread, since a manifest may
hash a blob's header chunk and every lease is a metadata write with an fsync; none of that may
stall the event loop that streams blobs and answers other replicas."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from api.deps import Node, PipelineId, Tenant
from api.schema import Lease, Manifest, PipelineFiles

router = APIRouter(tags=["replicas"])


@router.get("/v1/pipelines/{pipeline_id}/manifest", response_model=Manifest)
def manifest(
    pipeline_id: PipelineId,
    node: Node,
    tenant: Tenant,
    tp_size: Annotated[int, Query(ge=1, le=64)] = 1,
    rank: Annotated[int, Query(ge=0, le=63)] = 0,
) -> Manifest:
    """This rank's files and tensors; 409 ``not_warm`` while the pipeline is not warm."""
    return node.manifest(tenant, pipeline_id, tp_size=tp_size, rank=rank)


@router.get("/v1/pipelines/{pipeline_id}/files", response_model=PipelineFiles)
def files(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> PipelineFiles:
    """Every origin file and its blob, for ``weightcache pull``; 409 while not warm."""
    return PipelineFiles(files=node.files(tenant, pipeline_id))


@router.post("/v1/pipelines/{pipeline_id}/leases", response_model=Lease, status_code=201)
def create_lease(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> Lease:
    """Hold the pipeline against eviction while a replica loads it (expires unless renewed)."""
    return node.create_lease(tenant, pipeline_id)


@router.post("/v1/leases/{lease_id}", response_model=Lease)
def renew_lease(lease_id: str, node: Node, tenant: Tenant) -> Lease:
    return node.renew_lease(tenant, lease_id)


@router.delete("/v1/leases/{lease_id}", status_code=204)
def release_lease(lease_id: str, node: Node, tenant: Tenant) -> Response:
    node.release_lease(tenant, lease_id)
    return Response(status_code=204)
