"""Blob bodies on the API port: bounded memory per stream, and a bounded number of streams.

A stream reads one piece (``limits.blob_stream_piece``, 256 KiB) at a time and asks for the
next only once the server has taken the previous one: uvicorn's ``send`` waits while the
socket's write buffer is above its high-water mark, so a reader that stalls holds about two
pieces, not a chunk or a blob. The number of streams in flight is capped per node (503
``node_busy``) and per tenant (429 ``too_many_streams``), both with ``Retry-After``: a request
over a limit is answered at once, never queued.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import anyio
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from cache_node.errors import NodeBusy, TooManyStreams
from cache_node.metrics import NodeMetrics
from cache_node.settings import LimitSettings

__all__ = ["BlobBody", "StreamSlots"]


class StreamSlots:
    """Blob streams in flight on the API port, per node and per tenant."""

    def __init__(self, limits: LimitSettings, metrics: NodeMetrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self._lock = threading.Lock()
        self._total = 0
        self._by_tenant: dict[str, int] = {}

    def acquire(self, tenant: str) -> Callable[[], None]:
        """Take a slot for ``tenant``; returns its release (idempotent). Raises NodeBusy or
        TooManyStreams when a limit is reached."""
        limits = self.limits
        with self._lock:
            if self._total >= limits.blob_streams:
                self.metrics.blob_streams_refused.labels("node").inc()
                raise NodeBusy(
                    f"the node is serving {self._total} blob streams, its limit",
                    retry_after_s=limits.retry_after_s,
                    limit=limits.blob_streams,
                )
            held = self._by_tenant.get(tenant, 0)
            if held >= limits.blob_streams_per_tenant:
                self.metrics.blob_streams_refused.labels("tenant").inc()
                raise TooManyStreams(
                    f"tenant {tenant!r} has {held} blob streams open, its limit",
                    retry_after_s=limits.retry_after_s,
                    limit=limits.blob_streams_per_tenant,
                )
            self._total += 1
            self._by_tenant[tenant] = held + 1
            self.metrics.blob_streams.set(self._total)
        released = False

        def release() -> None:
            nonlocal released
            with self._lock:
                if released:
                    return
                released = True
                self._total -= 1
                left = self._by_tenant[tenant] - 1
                if left:
                    self._by_tenant[tenant] = left
                else:
                    del self._by_tenant[tenant]
                self.metrics.blob_streams.set(self._total)

        return release

    def in_flight(self, tenant: str | None = None) -> int:
        """Streams in flight, of the node or of one tenant."""
        with self._lock:
            return self._total if tenant is None else self._by_tenant.get(tenant, 0)


class BlobBody(Response):
    """A response whose body is ``first`` then the rest of ``pieces``, read one at a time.

    ``release`` runs when the response ends, however it ends (done, client gone, error). The
    iterator runs in a worker thread, one piece per step, and is closed at the end.
    """

    def __init__(
        self,
        *,
        status_code: int,
        headers: dict[str, str],
        first: bytes,
        pieces: Iterator[bytes],
        release: Callable[[], None],
    ) -> None:
        super().__init__(status_code=status_code, headers=headers,
                         media_type="application/octet-stream")
        self._first = first
        self._pieces = pieces
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        # After a disconnect uvicorn's send() drops the bytes silently: the watcher tells the
        # loop to stop reading, so a reader that leaves costs nothing more.
        gone = asyncio.ensure_future(_until_disconnect(receive))
        try:
            await send({"type": "http.response.start", "status": self.status_code,
                        "headers": self.raw_headers})
            piece = self._first
            while piece and not gone.done():
                # The next piece is read only once send() returns, and send() waits while
                # the client is behind: the backpressure that bounds this stream's memory.
                await send({"type": "http.response.body", "body": piece, "more_body": True})
                piece = await anyio.to_thread.run_sync(next, self._pieces, b"")
            if not gone.done():
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
            try:
                await anyio.to_thread.run_sync(_close, self._pieces)
            finally:
                self._release()


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def _close(pieces: Iterator[bytes]) -> None:
    close = getattr(pieces, "close", None)
    if close is not None:
        close()
