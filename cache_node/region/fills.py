"""Fills across the region: the origin pays once per region (I4 "per region with peers").

Before a node's transfer goes to the origin (``cache_node.fetch``), :meth:`RegionFills.fill`:

1. looks up whether the region already holds this origin object: the ``objects`` map, transfer
   key → sha256, written by the node that committed it. If a live peer holds that blob, the
   bytes come from the peer (its data plane, else its API: ``GET /v1/blobs/{sha256}`` with
   the region's node credentials), through the same :class:`~cache_node.transfer.Download` as
   from any origin: the sha256 of what arrives must equal the expected digest (I1), or the
   blob is not committed. A peer that fails or sends other bytes is logged
   (``region.peer_fill_failed``) and the next one is tried, then the origin;
2. otherwise, runs the transfer under region-wide single flight (``RegionFlight.run`` keyed by
   the transfer key): one node pulls from the origin and publishes the map entry and its
   location before it commits the flight; the others wait, then fill from it as in 1.

Without Redis (it is down), a fill goes to the origin as on a single node, and says so
(``region.fill_without_region``): the region is an optimisation of where bytes come from,
never a condition for getting them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio
import httpx

from cache_node.blob_records import BlobRecord
from cache_node.errors import IntegrityError, OriginError, WeightCacheError
from cache_node.events import emit
from cache_node.origins.base import Origin, OriginFile
from cache_node.region.errors import FlightTimeout, LeaseLost, RegionError
from cache_node.region.flight import Lease
from cache_node.transfer import discard_partial

if TYPE_CHECKING:
    from cache_node.region.node_region import NodeRegion

__all__ = ["Download", "PeerOrigin", "RegionFills"]

#: One fill of ``file`` from ``origin`` into the store (a ``cache_node.transfer.Download``).
Download = Callable[[Origin, OriginFile], Awaitable[BlobRecord]]


class PeerOrigin:
    """A region peer as an origin of one blob: ranged reads of ``GET /v1/blobs/{sha256}``.

    Its errors are not retryable on purpose: a peer that fails is skipped for the next one
    (or the origin) at once, instead of being retried with backoff.
    """

    is_peer = True

    def __init__(
        self, client: httpx.AsyncClient, *, url: str, sha256: str, headers: dict[str, str]
    ) -> None:
        self.scope = f"peer:{url}"
        self.url = url
        self._client = client
        self._blob_url = f"{url.rstrip('/')}/v1/blobs/{sha256}"
        self._headers = headers

    async def resolve(self) -> Any:  # the Origin protocol; a peer is never resolved
        raise NotImplementedError

    def pin(self, snapshot: Any) -> None:
        raise NotImplementedError

    async def aclose(self) -> None:
        return None

    async def read_range(self, file: OriginFile, start: int, end: int) -> AsyncIterator[bytes]:
        headers = {**self._headers, "Range": f"bytes={start}-{end - 1}"}
        try:
            async with self._client.stream("GET", self._blob_url, headers=headers) as response:
                if response.status_code not in (200, 206) or (
                    response.status_code == 200 and (start, end) != (0, file.size)
                ):
                    raise OriginError(
                        f"peer {self.url} answered {response.status_code} for {file.path}",
                        retryable=False, status=response.status_code,
                    )
                async for data in response.aiter_bytes():
                    yield data
        except httpx.HTTPError as exc:
            raise OriginError(
                f"peer {self.url} failed: {type(exc).__name__}", retryable=False
            ) from None


class RegionFills:
    """A node's fills through its region (see the module docstring)."""

    def __init__(self, region: NodeRegion) -> None:
        self.region = region

    async def fill(
        self, key: str, origin: Origin, file: OriginFile, download: Download
    ) -> BlobRecord:
        """The committed blob of ``file`` (transfer key ``key``): from a peer, else the
        origin, at most once per region while Redis answers."""
        region = self.region
        if not region.membership.reachable:
            return await self._without_region(key, origin, file, download, "unreachable")
        try:
            record = await self._from_peers(key, file, download)
            if record is not None:
                return record
            led: list[BlobRecord] = []

            async def lead(_: Lease) -> dict[str, Any]:
                record = await download(origin, file)
                region.node.metrics.region_fills.labels("origin").inc()
                led.append(record)
                # before the commit: a waiter that hears "done" finds where to fill from
                await self._publish_quietly(key, record)
                return {"sha256": record.sha256}

            result = await region.flight.run(key, lead, timeout_s=region.settings.flight_wait_s)
        except (RegionError, LeaseLost, FlightTimeout) as exc:
            # Redis failed, lost this leader's lease (it restarted empty, or was away past the
            # lease's TTL), or another leader's fill outlasted the wait: the origin without
            # the region rather than a failed pipeline (at worst the origin sends it twice)
            if led:  # committed here; only the flight's end did not reach Redis
                return led[0]
            return await self._without_region(key, origin, file, download,
                                              f"{exc.code}: {exc.message}")
        if led:
            return led[0]
        if not result.ok:
            error = result.detail
            raise OriginError(
                f"{file.path}: the region's fill by {result.holder} failed: "
                f"{error.get('message', error.get('code', 'unknown error'))}",
                retryable=True, region_code=error.get("code"), path=file.path,
            )
        emit("region.fill_waited", key=key, path=file.path, leader=result.holder)
        try:
            record = await self._from_peers(key, file, download)
        except RegionError as exc:
            return await self._without_region(key, origin, file, download, exc.message)
        if record is not None:
            return record
        # The leader committed, but no live peer could hand the bytes over (it died since, or
        # sent bad bytes): the origin, once more, rather than no blob at all.
        emit("region.fill_from_origin_after_wait", level=logging.WARNING, key=key,
             path=file.path, leader=result.holder)
        record = await download(origin, file)
        await self._publish_quietly(key, record)
        return record

    async def _from_peers(
        self, key: str, file: OriginFile, download: Download
    ) -> BlobRecord | None:
        """The blob from the first live peer that sends the right bytes; None if none does."""
        region = self.region
        sha256 = await region.object_blob(key)
        if sha256 is None or (file.sha256 and file.sha256.lower() != sha256):
            return None
        # The origin's own digest when it declared one (a git sha1, an md5): a peer's bytes
        # are checked against what the origin said, not only against what Redis says the
        # blob is; else the region's sha256 of the object.
        declared = file.sha256 or file.git_sha1 or file.md5
        expected = file if declared else file.model_copy(update={"sha256": sha256})
        for node_id, url in await region.peer_urls(sha256):
            peer = PeerOrigin(region.http, url=url, sha256=sha256, headers=region.peer_headers)
            try:
                record = await download(peer, expected)
            except (OriginError, IntegrityError) as exc:
                # what it sent is not resumed by the next peer or the origin
                await anyio.to_thread.run_sync(discard_partial, region.node.store, key)
                region.node.metrics.region_fills.labels("peer_failed").inc()
                emit("region.peer_fill_failed", level=logging.WARNING, peer=node_id, url=url,
                     blob=sha256, path=file.path, code=exc.code, error=exc.message)
                continue
            region.node.metrics.region_fills.labels("peer").inc()
            emit("region.peer_fill", peer=node_id, blob=sha256, path=file.path, size=file.size)
            await self._publish_quietly(key, record)
            return record
        return None

    async def _without_region(
        self, key: str, origin: Origin, file: OriginFile, download: Download, why: str
    ) -> BlobRecord:
        emit("region.fill_without_region", level=logging.WARNING, key=key, path=file.path,
             error=why)
        self.region.node.metrics.region_fills.labels("origin_without_region").inc()
        record = await download(origin, file)
        await self.region.remember_object(key, record)  # published when Redis is back
        return record

    async def _publish_quietly(self, key: str, record: BlobRecord) -> None:
        try:
            await self.region.published_fill(key, record)
        except WeightCacheError as exc:  # published again when Redis is back
            emit("region.publish_failed", level=logging.WARNING, key=key, error=exc.message)
