"""``/v1/pipelines/{id}/captures``: engine shard sets and compile caches replicas upload.

``PUT .../captures/{capture_id}?{key fields}&sha256=HEX`` takes the bytes as the request body
(``Content-Length`` required); ``capture_id`` must be the id of the key the query gives
(:func:`api.schema.capture_id`). The node reserves the bytes first (507 when there is no
room), writes them while hashing them, and stores nothing unless they are exactly the declared
size and sha256. Reads and listing are plain ``def`` handlers (metadata, in worker threads);
the upload streams the body on the event loop and writes it in worker threads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import anyio
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from api import views
from api.deps import Node, PipelineId, Tenant
from api.schema import CaptureInfo, CaptureKey, CaptureList, is_sha256
from cache_node.errors import InvalidInput, UploadStalled, WeightCacheError

router = APIRouter(prefix="/v1/pipelines/{pipeline_id}/captures", tags=["captures"])

#: Query parameters of an upload that are not fields of its key.
_NOT_KEY = frozenset({"sha256", "tenant"})
#: Writes to disk happen in pieces of about this size, each in a worker thread.
_WRITE_BATCH = 4 << 20


def capture_id_param(capture_id: Annotated[str, Path(max_length=64)]) -> str:
    if not is_sha256(capture_id):
        raise InvalidInput(f"not a capture id: {capture_id[:80]!r}", field="capture_id")
    return capture_id


CaptureId = Annotated[str, Depends(capture_id_param)]


def _key_of(request: Request) -> CaptureKey:
    """The capture key in an upload's query (every parameter but ``sha256`` and ``tenant``)."""
    fields = {k: v for k, v in request.query_params.items() if k not in _NOT_KEY}
    try:
        return CaptureKey.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "key"
        raise InvalidInput(f"capture key: {where}: {first.get('msg', 'invalid')}",
                           field="key") from None


def _content_length(request: Request) -> int:
    raw = request.headers.get("content-length", "")
    if not raw.isascii() or not raw.isdigit():
        raise InvalidInput("an upload needs its Content-Length", field="content-length")
    return int(raw)


@router.get("", response_model=CaptureList)
def list_captures(pipeline_id: PipelineId, node: Node, tenant: Tenant) -> CaptureList:
    """The pipeline's captures (404 for a pipeline the caller cannot see)."""
    return CaptureList(
        captures=[views.capture_summary(c) for c in node.captures.list(tenant, pipeline_id)]
    )


@router.get("/{capture_id}", response_model=CaptureInfo)
def show_capture(
    pipeline_id: PipelineId, capture_id: CaptureId, node: Node, tenant: Tenant
) -> CaptureInfo:
    """One capture: its key, stage, tensors and blob (read it with ``GET /v1/blobs``)."""
    return views.capture_info(*node.captures.get(tenant, pipeline_id, capture_id))


@router.put("/{capture_id}", response_model=CaptureInfo, status_code=201)
async def upload_capture(
    pipeline_id: PipelineId,
    capture_id: CaptureId,
    request: Request,
    node: Node,
    tenant: Tenant,
    sha256: Annotated[str, Query(min_length=64, max_length=64)],
) -> CaptureInfo:
    """Store a capture (replacing one of the same id): 201 once its bytes are verified."""
    if not is_sha256(sha256):
        raise InvalidInput("sha256 must be 64 lowercase hex digits", field="sha256")
    key = _key_of(request)
    size = _content_length(request)
    pending = await run_in_threadpool(
        lambda: node.captures.begin(tenant, pipeline_id, capture_id, key, size=size,
                                   sha256=sha256)
    )
    try:
        batch = bytearray()
        async for data in _stream(request, idle_s=node.settings.captures.upload_idle_s):
            batch += data
            if len(batch) >= _WRITE_BATCH:
                await anyio.to_thread.run_sync(pending.write, bytes(batch))
                batch.clear()
        if batch:
            await anyio.to_thread.run_sync(pending.write, bytes(batch))
        capture, blob = await anyio.to_thread.run_sync(node.captures.commit, pending)
    except BaseException as exc:
        await anyio.to_thread.run_sync(pending.abort)  # a client gone, a bad byte: nothing kept
        if isinstance(exc, WeightCacheError):
            pending.refuse(exc)  # counted and logged once, wherever it was found
        raise
    return views.capture_info(capture, blob)


async def _stream(request: Request, *, idle_s: float) -> AsyncIterator[bytes]:
    """The request body; UploadStalled when nothing arrives for ``idle_s`` (a sender that
    holds its reservation open without sending is dropped, not waited on forever)."""
    chunks = request.stream().__aiter__()
    while True:
        try:
            with anyio.fail_after(idle_s):
                data = await chunks.__anext__()
        except StopAsyncIteration:
            return
        except TimeoutError:
            raise UploadStalled(f"the upload sent nothing for {idle_s:g} s",
                                idle_s=idle_s) from None
        yield data


@router.delete("/{capture_id}", status_code=204)
def delete_capture(
    pipeline_id: PipelineId, capture_id: CaptureId, node: Node, tenant: Tenant
) -> Response:
    node.captures.delete(tenant, pipeline_id, capture_id)
    return Response(status_code=204)
