"""``/v1/pipelines``: register, list, show, warm, evict, delete, pin and unpin.

Reads are plain ``def`` handlers (worker threads: a status reads metadata and stats blobs);
the async ones await the node and build their answer in a thread too."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Response

from api.deps import Node, PipelineId, Tenant
from api.schema import PipelineList, PipelineSpec, PipelineStatus
from api.views import pipeline_status

router = APIRouter(prefix="/v1/pipelines", tags=["pipelines"])


@router.put("/{pipeline_id}", response_model=PipelineStatus, status_code=202)
async def register(
    pipeline_id: PipelineId, spec: PipelineSpec, node: Node, tenant: Tenant, response: Response
) -> PipelineStatus:
    """Register (upsert) a pipeline and start its pre-warm; 200 when nothing changed."""
    record, changed = await node.register(tenant, pipeline_id, spec)
    if not changed:
        response.status_code = 200
    return await anyio.to_thread.run_sync(pipeline_status, node, record)


@router.get("", response_model=PipelineList)
def list_pipelines(node: Node, tenant: Tenant) -> PipelineList:
    return PipelineList(pipelines=[pipeline_status(node, r) for r in node.records(tenant)])


@router.get("/{pipeline_id}", response_model=PipelineStatus)
def show(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> PipelineStatus:
    return pipeline_status(node, node.record(tenant, pipeline_id))


@router.post("/{pipeline_id}/warm", response_model=PipelineStatus, status_code=202)
async def warm(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> PipelineStatus:
    """Re-warm after eviction or failure."""
    record = await node.warm(tenant, pipeline_id)
    return await anyio.to_thread.run_sync(pipeline_status, node, record)


@router.post("/{pipeline_id}/evict", response_model=PipelineStatus, status_code=202)
async def evict(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> PipelineStatus:
    """Free a pipeline's bytes; it stays registered as ``evicted``."""
    await node.evict(tenant, pipeline_id)
    return await anyio.to_thread.run_sync(
        lambda: pipeline_status(node, node.record(tenant, pipeline_id))
    )


@router.post("/{pipeline_id}/pin", response_model=PipelineStatus)
async def pin(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> PipelineStatus:
    """Never evict this pipeline (its spec's ``pinned``, set in place: nothing re-fetched).

    On the event loop, like the warm jobs' saves: a pin read and written in a worker thread
    could land between a job's read of the stored record and its write, and be lost."""
    record = node.set_pinned(tenant, pipeline_id, pinned=True)
    return await anyio.to_thread.run_sync(pipeline_status, node, record)


@router.post("/{pipeline_id}/unpin", response_model=PipelineStatus)
async def unpin(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> PipelineStatus:
    """Let the eviction policy consider this pipeline again (on the loop, as ``pin``)."""
    record = node.set_pinned(tenant, pipeline_id, pinned=False)
    return await anyio.to_thread.run_sync(pipeline_status, node, record)


@router.delete("/{pipeline_id}", status_code=204)
async def delete(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> Response:
    await node.delete(tenant, pipeline_id)
    return Response(status_code=204)
