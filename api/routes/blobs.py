"""``GET /v1/blobs/{sha256}``: verified blob bytes, with Range."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from api.deps import Node, Tenant
from api.errors import error_response
from api.ranges import RangeNotSatisfiable, parse_range
from cache_node.store import check_sha256

router = APIRouter(tags=["blobs"])


@router.get("/v1/blobs/{sha256}", response_model=None)
async def get_blob(sha256: str, request: Request, node: Node, tenant: Tenant) -> Response:
    """The blob's bytes, 200 or 206; 404 unless a pipeline of the caller's tenant holds it."""
    record = node.authorize_blob(tenant, check_sha256(sha256))
    headers = {"ETag": f'"{record.sha256}"', "Accept-Ranges": "bytes"}
    try:
        span = parse_range(request.headers.get("range"), record.size)
    except RangeNotSatisfiable:
        response = error_response(416, "range_not_satisfiable", "range outside the blob")
        response.headers.update({**headers, "Content-Range": f"bytes */{record.size}"})
        return response
    start, end = span if span is not None else (0, record.size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{record.size}"
    headers["Content-Length"] = str(end - start)
    pieces = node.iter_blob(sha256, start, end)
    # The first chunk is verified before the headers go out, so a corrupt blob is a 5xx
    # (then re-fetched); a later mismatch aborts the connection, never a clean short body (I2).
    first = await run_in_threadpool(next, pieces, b"")
    return StreamingResponse(
        _chain(first, pieces),
        status_code=206 if span is not None else 200,
        headers=headers,
        media_type="application/octet-stream",
    )


async def _chain(first: bytes, rest: Iterator[bytes]) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for piece in iterate_in_threadpool(rest):
        yield piece
