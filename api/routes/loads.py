"""Cold-start history: replicas report their loads; the dashboard reads them back.

Plain ``def`` handlers: the history is metadata reads and writes, run in worker threads."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from api.deps import Node, PipelineId, Tenant
from api.schema import LoadList, LoadReport
from cache_node.load_history import DEFAULT_LIMIT, LoadHistory

router = APIRouter(tags=["loads"])


def get_load_history(request: Request) -> LoadHistory:
    history: LoadHistory = request.app.state.load_history
    return history


History = Annotated[LoadHistory, Depends(get_load_history)]
Limit = Annotated[int, Query(ge=1, le=DEFAULT_LIMIT)]


@router.post("/v1/pipelines/{pipeline_id}/loads", response_model=LoadReport, status_code=202)
def report_load(
    pipeline_id: PipelineId, report: LoadReport, node: Node, tenant: Tenant, history: History
) -> LoadReport:
    """Record one replica load's stage timings (404 for a pipeline the caller cannot see)."""
    owner = node.record(tenant, pipeline_id).tenant
    return history.record(owner, pipeline_id, report)


@router.get("/v1/pipelines/{pipeline_id}/loads", response_model=LoadList)
def pipeline_loads(
    pipeline_id: PipelineId,
    node: Node,
    tenant: Tenant,
    history: History,
    limit: Limit = DEFAULT_LIMIT,
) -> LoadList:
    """The pipeline's recent loads, newest first."""
    owner = node.record(tenant, pipeline_id).tenant
    return LoadList(loads=history.recent(owner, pipeline_id, limit=limit))


@router.get("/v1/loads", response_model=LoadList)
def all_loads(
    node: Node, tenant: Tenant, history: History, limit: Limit = DEFAULT_LIMIT
) -> LoadList:
    """The newest loads over every pipeline the caller can see."""
    visible = [(record.tenant, record.id) for record in node.records(tenant)]
    return LoadList(loads=history.recent_of(visible, limit=limit))
