"""``GET`` and ``HEAD /v1/blobs/{sha256}``: verified blob bytes, with Range (RFC 9110).

The status and headers come from :func:`api.ranges.plan_blob_response`, as on the data plane,
so a request gets the same answer on both ports. Bodies stream in small pieces under the
node's stream limits (:mod:`api.blob_stream`).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from api.blob_stream import BlobBody, StreamSlots
from api.deps import BlobReader, Node
from api.errors import error_response
from api.ranges import plan_blob_response
from cache_node.region.peer_auth import Peer
from cache_node.store import check_sha256

router = APIRouter(tags=["blobs"])


@router.get("/v1/blobs/{sha256}", response_model=None)
async def get_blob(sha256: str, request: Request, node: Node, reader: BlobReader) -> Response:
    """The blob's bytes, 200 or 206; 404 unless a pipeline of the caller's tenant holds it
    (a region peer, authenticated by the region secret, reads any blob this node holds)."""
    return await _answer(sha256, request, node, reader)


@router.head("/v1/blobs/{sha256}", response_model=None)
async def head_blob(sha256: str, request: Request, node: Node, reader: BlobReader) -> Response:
    """The headers ``GET`` would send (without applying a Range), and no body."""
    return await _answer(sha256, request, node, reader)


async def _answer(sha256: str, request: Request, node: Node, reader: str | Peer) -> Response:
    # the registry's blob index and the store's record: metadata reads, in a worker thread
    check_sha256(sha256)
    if isinstance(reader, Peer):
        assert node.region is not None  # a Peer is authenticated only by a node's region
        record = await run_in_threadpool(node.region.blob_for_peer, sha256)
        tenant = f"peer {reader.node_id}"  # its stream slots (not a tenant: a space in it)
    else:
        tenant = reader
        record = await run_in_threadpool(node.authorize_blob, tenant, sha256)
    answer = plan_blob_response(
        method=request.method,
        range_fields=request.headers.getlist("range"),
        if_range=request.headers.get("if-range"),
        sha256=record.sha256,
        size=record.size,
    )
    if answer.status == 416:
        response = error_response(416, "range_not_satisfiable", "range outside the blob")
        response.headers.update(answer.headers)
        return response
    if not answer.send_body:  # HEAD: the headers of the GET, no body, no stream slot
        return Response(status_code=answer.status, headers=answer.headers,
                        media_type="application/octet-stream")
    slots: StreamSlots = request.app.state.blob_streams
    release = slots.acquire(tenant)
    try:
        pieces = node.iter_blob(
            sha256, answer.start, answer.end, piece_size=node.settings.limits.blob_stream_piece
        )
        # The first chunk is verified before the headers go out, so a corrupt blob is a 5xx
        # (then re-fetched); a later mismatch aborts the connection, never a clean short body (I2).
        first = await run_in_threadpool(next, pieces, b"")
    except BaseException:
        release()
        raise
    return BlobBody(
        status_code=answer.status,
        headers=answer.headers,
        first=first,
        pieces=pieces,
        release=release,
    )
