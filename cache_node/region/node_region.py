"""A cache node's part in its region: what ``weightcache serve --redis URL`` adds to a node.

:class:`NodeRegion` wires the region's building blocks into one :class:`~cache_node.node.
CacheNode`, through small hooks there (the single-node default runs none of this):

- **membership**: heartbeats report the store's usage; ``/readyz`` says ``region_unreachable``
  while Redis is down (the node keeps serving what it holds); whenever Redis may have forgotten
  the node (first beat, Redis back, even restarted empty) it publishes again its blobs, the
  origin objects it committed, and its pipelines (:meth:`NodeRegion.rejoin`);
- **blob locations**: kept equal to the store's blobs, nudged by every publish, delete and
  quarantine (``BlobStore.on_change``) and checked every heartbeat interval;
- **the pipeline catalogue** (``cache_node.region.catalogue``): registrations and deletions
  on this node are written there; every node reconciles periodically and on a nudge;
- **fills** (``cache_node.region.fills``): peers before the origin, one origin pull per region;
- **views**: the holders of each blob for manifests, and ``GET /v1/region``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Coroutine
from typing import TYPE_CHECKING, Any, cast

import anyio
import httpx

from api.schema import (
    Manifest,
    PipelineSpec,
    RegionInfo,
    RegionNode,
    RegionPipeline,
    is_node_url,
)
from cache_node.blob_records import BlobRecord
from cache_node.errors import NotFound, WeightCacheError
from cache_node.events import emit
from cache_node.region.blob_locations import BlobLocations
from cache_node.region.catalogue import CatalogueEntry, PipelineCatalogue, catalogue_field
from cache_node.region.connection import open_redis, redis_errors, texts
from cache_node.region.errors import RegionError
from cache_node.region.fills import RegionFills
from cache_node.region.flight import RegionFlight
from cache_node.region.membership import Membership, NodeRecord, NodeReport, RejoinReason
from cache_node.region.peer_auth import RegionSecret
from cache_node.region.placement import rank

if TYPE_CHECKING:
    from cache_node.node import CacheNode
    from cache_node.settings import NodeSettings

__all__ = ["NodeRegion"]

#: This node's record of the origin objects it committed (transfer key → sha256), so that it
#: can publish them again to a Redis that lost them.
_OBJECT_PREFIX = "region-object:"
_UNPUBLISHED_PREFIX = "region-unpublished:"
_DELETED_PREFIX = "region-deleted:"
#: How long a node remembers a deletion, to write it back over a copy a node that missed it
#: would bring back after Redis restarted empty.
_DELETION_MEMORY_S = 30 * 24 * 3600.0


class NodeRegion:
    """One node's membership of its region (see the module docstring)."""

    def __init__(self, node: CacheNode) -> None:
        settings = node.settings
        assert settings.redis_url is not None
        if settings.regional.secret is None:
            raise ValueError("a node in a region needs the region secret "
                             "(WEIGHTCACHE_REGION_SECRET)")
        self.node = node
        self.settings = settings.regional
        self.node_id = settings.node_id
        self.region = settings.region
        self.secret = RegionSecret(settings.regional.secret)
        self.peer_headers = self.secret.headers(self.node_id)
        self.api_url = (settings.regional.advertise_url or _serving_url(settings)).rstrip("/")
        self.redis = open_redis(settings.redis_url, timeout_s=self.settings.redis_timeout_s)
        self.membership = Membership(
            self.redis, region=self.region, node_id=self.node_id, url=self.api_url,
            data_url=settings.data_url, report=self._report, on_rejoin=self.rejoin,
            ttl_s=self.settings.heartbeat_ttl_s, interval_s=self.settings.heartbeat_interval_s,
        )
        self.locations = BlobLocations(self.redis, region=self.region)
        self.flight = RegionFlight(self.redis, region=self.region, holder=self.node_id,
                                   lease_ttl_s=self.settings.flight_lease_ttl_s)
        self.catalogue = PipelineCatalogue(self.redis, region=self.region, node_id=self.node_id)
        self.fills = RegionFills(self)
        self.http = httpx.AsyncClient(timeout=httpx.Timeout(
            self.settings.peer_timeout_s, connect=self.settings.redis_timeout_s))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._held_changed = asyncio.Event()
        self._reconcile_lock = asyncio.Lock()
        self._applying: set[str] = set()  # catalogue entries this node is applying now
        #: Registrations and deletions that did not reach Redis: written when it is back. Kept
        #: in the node's metadata too, so that a restart in between loses none (a deletion
        #: lost here would come back from the others' copies).
        self._unpublished: dict[str, tuple[str, str, PipelineSpec | None, float]] = {}
        for name, value in node.meta.scan(_UNPUBLISHED_PREFIX):
            spec = value.get("spec")
            self._unpublished[name.removeprefix(_UNPUBLISHED_PREFIX)] = (
                value["tenant"], value["id"],
                None if spec is None else PipelineSpec.model_validate(spec),
                float(value.get("at", 0.0)))
        self._tasks: list[asyncio.Task[None]] = []
        node.fetcher.region = self.fills
        node.store.on_change = self._store_changed

    @property
    def blob_url(self) -> str:
        """Where replicas and peers read this node's blobs: its data plane, else its API."""
        return (self.node.settings.data_url or self.api_url).rstrip("/")

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Join the region (one beat now, a Redis that is down is an outage, not a failure),
        then keep locations and pipelines in step in the background."""
        self._loop = asyncio.get_running_loop()
        await self.membership.start()
        for name, work in (("blob locations", self._locations_loop()),
                           ("catalogue", self._catalogue_loop())):
            self._tasks.append(asyncio.create_task(work, name=f"region {name}"))

    async def stop(self) -> None:
        """Leave the region (the record goes now: placement moves at once)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
        await self.membership.stop(leave=True)
        await self.http.aclose()
        await self.redis.aclose()

    def readiness_check(self) -> dict[str, Any] | None:
        """``/readyz``: ``region_unreachable`` while Redis is down."""
        return self.membership.readiness_check()

    async def _report(self) -> NodeReport:
        usage = await anyio.to_thread.run_sync(self.node.store.usage)
        return NodeReport(capacity=usage.capacity, used=usage.committed, free=usage.free)

    async def rejoin(self, reason: RejoinReason) -> None:
        """Redis may have forgotten this node: publish its blobs, the origin objects it
        committed, and its pipelines again (RegionError: tried again on the next beat)."""
        blobs = await self._held_blobs()
        await self.locations.publish_all(self.node_id, blobs)
        objects = await anyio.to_thread.run_sync(self._remembered_objects, blobs)
        if objects:
            with redis_errors("publishing origin objects"):
                await self.redis.hset(self.locations.keys.objects, mapping=cast(Any, objects))
        # the pipelines apart, not in this beat: registering many must not delay the next one
        self._tasks = [task for task in self._tasks if not task.done()]
        self._tasks.append(asyncio.create_task(self._reconcile_quietly(), name="region rejoin"))
        dropped = await self.locations.drop_dead()
        emit("region.republished", reason=reason, blobs=len(blobs), objects=len(objects),
             dropped_dead=dropped)

    # ------------------------------------------------------------------ blob locations
    def _store_changed(self) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._held_changed.set)

    async def _held_blobs(self) -> set[str]:
        return await anyio.to_thread.run_sync(
            lambda: {record.sha256 for record in self.node.store.records()}
        )

    async def _locations_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.settings.heartbeat_interval_s):
                    await self._held_changed.wait()
            self._held_changed.clear()
            self.node.metrics.region_reachable.set(int(self.membership.reachable))
            if not self.membership.reachable:
                continue  # the rejoin publishes everything when Redis is back
            try:
                await self.locations.publish_all(self.node_id, await self._held_blobs())
            except RegionError as exc:
                emit("region.locations_failed", level=logging.WARNING, error=exc.message)
            except Exception:  # the loop must outlive one bad pass
                logging.getLogger("weightcache.region").exception("blob locations pass failed")

    async def published_fill(self, key: str, record: BlobRecord) -> None:
        """A fill committed ``record`` for transfer ``key``: the region may fill from here."""
        await self.remember_object(key, record)
        with redis_errors("publishing an origin object"):
            await self.redis.hset(self.locations.keys.objects, key, record.sha256)
        await self.locations.add(self.node_id, [record.sha256])

    async def remember_object(self, key: str, record: BlobRecord) -> None:
        """Note here that transfer ``key`` is blob ``record`` (published again on a rejoin)."""
        await anyio.to_thread.run_sync(
            self.node.meta.set, _OBJECT_PREFIX + key, {"sha256": record.sha256})

    def _remembered_objects(self, held: set[str]) -> dict[str, str]:
        return {
            name.removeprefix(_OBJECT_PREFIX): str(value.get("sha256"))
            for name, value in self.node.meta.scan(_OBJECT_PREFIX)
            if value.get("sha256") in held
        }

    async def object_blob(self, key: str) -> str | None:
        """The blob the region committed for transfer ``key``, if any."""
        with redis_errors("reading the region's origin objects"):
            value = await self.redis.hget(self.locations.keys.objects, key)
        return None if value is None else str(value)

    async def peer_urls(self, sha256: str) -> list[tuple[str, str]]:
        """(node id, URL) of the live peers holding ``sha256``, rendezvous order: each peer's
        data plane, then its advertised API (the data plane's URL is the one replicas are
        given, which another node may not reach: a compose network publishes it on the
        host's loopback)."""
        live = {n.node_id: n for n in await self.membership.live_nodes()}
        peers = await self.locations.peers(sha256, live=live, exclude=self.node_id)
        return [
            (node_id, url.rstrip("/"))
            for node_id in peers
            for url in dict.fromkeys(u for u in (live[node_id].data_url, live[node_id].url) if u)
        ]

    def blob_for_peer(self, sha256: str) -> BlobRecord:
        """A blob by digest for a peer's fill (no tenant: peers read any committed blob)."""
        record = self.node.store.get(sha256)
        if record is None:
            raise NotFound(f"no blob {sha256}")
        return record

    # ------------------------------------------------------------------ the catalogue
    async def registered(self, tenant: str, pipeline_id: str, spec: PipelineSpec | None) -> None:
        """A pipeline was registered (``spec``) or deleted (None) on this node: tell the
        region, unless this is the node applying the region's own entry."""
        field = catalogue_field(tenant, pipeline_id)
        if field in self._applying:
            return
        at = time.time()
        self._unpublished[field] = (tenant, pipeline_id, spec, at)
        await anyio.to_thread.run_sync(self.node.meta.set, _UNPUBLISHED_PREFIX + field, {
            "tenant": tenant, "id": pipeline_id, "at": at,
            "spec": None if spec is None else spec.model_dump(mode="json")})
        await anyio.to_thread.run_sync(self._remember_deletion, field, tenant, pipeline_id,
                                       at if spec is None else None)
        if self.membership.reachable:  # else at once, not after a Redis timeout: on rejoin
            with contextlib.suppress(RegionError):
                await self._flush_unpublished()

    def _remember_deletion(
        self, field: str, tenant: str, pipeline_id: str, at: float | None
    ) -> None:
        """Keep (``at``: when it was deleted) or forget this node's memory of a deletion."""
        if at is None:
            self.node.meta.delete(_DELETED_PREFIX + field)
        else:
            self.node.meta.set(_DELETED_PREFIX + field,
                               {"tenant": tenant, "id": pipeline_id, "at": at})

    def _remembered_deletions(self) -> dict[str, tuple[str, str, float]]:
        """The deletions this node made or applied, younger than the memory's horizon (older
        ones are forgotten here)."""
        horizon = time.time() - _DELETION_MEMORY_S
        kept: dict[str, tuple[str, str, float]] = {}
        for name, value in list(self.node.meta.scan(_DELETED_PREFIX)):
            at = float(value.get("at", 0.0))
            if at < horizon:
                self.node.meta.delete(name)
            else:
                kept[name.removeprefix(_DELETED_PREFIX)] = (value["tenant"], value["id"], at)
        return kept

    async def _flush_unpublished(self) -> None:
        for field, (tenant, pipeline_id, spec, at) in list(self._unpublished.items()):
            await self.catalogue.put(tenant, pipeline_id, spec, at=at)
            if self._unpublished.get(field) == (tenant, pipeline_id, spec, at):
                del self._unpublished[field]
                await anyio.to_thread.run_sync(self.node.meta.delete,
                                               _UNPUBLISHED_PREFIX + field)

    async def _catalogue_loop(self) -> None:
        while True:
            try:
                with redis_errors("listening to the pipeline catalogue"):
                    async with self.redis.pubsub() as pubsub:
                        await pubsub.subscribe(self.catalogue.keys.catalogue_channel)
                        while True:
                            await self.reconcile()
                            await pubsub.get_message(ignore_subscribe_messages=True,
                                                     timeout=self.settings.reconcile_interval_s)
            except RegionError:
                await asyncio.sleep(self.settings.heartbeat_interval_s)
            except Exception:  # the loop must outlive one bad pass
                logging.getLogger("weightcache.region").exception("catalogue pass failed")
                await asyncio.sleep(self.settings.reconcile_interval_s)

    async def _reconcile_quietly(self) -> None:
        try:
            await self.reconcile()
        except RegionError as exc:  # the catalogue loop tries again
            emit("region.reconcile_failed", level=logging.WARNING, error=exc.message)

    async def reconcile(self) -> None:
        """Bring this node's pipelines in step with the catalogue: register what it lacks
        (or has with another spec), delete what was deleted, and publish what only this node
        has (a registration made while Redis was away, or a Redis that restarted empty)."""
        async with self._reconcile_lock:
            await self._flush_unpublished()
            entries = await self.catalogue.entries()
            local = {
                catalogue_field(r.tenant, r.id): r
                for r in await anyio.to_thread.run_sync(lambda: list(self.node.registry.all()))
            }
            deleted = await anyio.to_thread.run_sync(self._remembered_deletions)
            for field, (tenant, pipeline_id, at) in deleted.items():
                entry = entries.get(field)
                if entry is None or (entry.spec is not None and entry.at < at):
                    # Redis lost the deletion, and maybe a node that missed it wrote its older
                    # copy back: the deletion is newer, and goes back over it
                    await self.catalogue.put(tenant, pipeline_id, None, at=at)
                    emit("region.deletion_restored", level=logging.WARNING, pipeline=field,
                         over=None if entry is None else entry.node_id)
                    entries[field] = CatalogueEntry(tenant=tenant, id=pipeline_id, at=at)
            for field, entry in entries.items():
                record = local.get(field)
                if entry.spec is None:
                    if record is not None:
                        await self._apply(field, self.node.delete(entry.tenant, entry.id))
                        await anyio.to_thread.run_sync(
                            self._remember_deletion, field, entry.tenant, entry.id,
                            entry.at or time.time())
                    continue
                if field in deleted:  # registered again since: the deletion is history
                    await anyio.to_thread.run_sync(
                        self._remember_deletion, field, entry.tenant, entry.id, None)
                newest = None if record is None else (record.pending or record).spec
                if newest != entry.spec:
                    await self._apply(field, self.node.register(entry.tenant, entry.id,
                                                                entry.spec))
            for field, record in local.items():
                if field not in entries:
                    version = record.pending or record
                    await self.catalogue.put(record.tenant, record.id, version.spec,
                                             at=version.registered_at)
            # A node that died without leaving (its membership expired) still lists its blobs:
            # any live node forgets them, not only one that happens to rejoin.
            dropped = await self.locations.drop_dead()
            if dropped:
                emit("region.dead_nodes_dropped", level=logging.WARNING, nodes=dropped)

    async def _apply(self, field: str, change: Coroutine[Any, Any, Any]) -> None:
        self._applying.add(field)
        try:
            await change
            emit("region.catalogue_applied", pipeline=field)
        except WeightCacheError as exc:
            emit("region.catalogue_apply_failed", level=logging.WARNING, pipeline=field,
                 code=exc.code, error=exc.message)
        finally:
            self._applying.discard(field)

    # ------------------------------------------------------------------ views
    async def holder_ids(
        self, blobs: list[str]
    ) -> tuple[dict[str, list[str]], dict[str, NodeRecord]]:
        """The live nodes holding each blob (this one when it holds it), rendezvous order,
        and the live nodes' records."""
        live = {n.node_id: n for n in await self.membership.live_nodes()}
        with redis_errors("reading blob locations"):
            pipe = self.redis.pipeline(transaction=False)
            for blob in blobs:
                pipe.smembers(self.locations.keys.blob(blob))
            found = await pipe.execute()
        held_here = await anyio.to_thread.run_sync(
            lambda: {b for b in blobs if self.node.store.has(b)})
        answer: dict[str, list[str]] = {}
        for blob, members in zip(blobs, found, strict=True):
            ids = set(texts(members)) & set(live)
            if blob in held_here:
                ids.add(self.node_id)
            answer[blob] = rank(blob, ids)
        return answer, live

    async def holders(self, blobs: list[str]) -> dict[str, list[str]]:
        """Blob URLs of the live nodes holding each blob, rendezvous order. A node whose
        advertised URL is not an ``http(s)://host[:port][/prefix]`` is left out (and said):
        a replica sends its token to every URL it is given."""
        ids, live = await self.holder_ids(blobs)
        urls = {self.node_id: self.blob_url}
        for node_id, record in live.items():
            if node_id == self.node_id:
                continue
            url = _blob_url(record)
            if is_node_url(url):
                urls[node_id] = url
            else:
                emit("region.bad_node_url", level=logging.WARNING, node=node_id, url=url[:200])
        return {blob: [urls[n] for n in nodes if n in urls] for blob, nodes in ids.items()}

    def with_holders(self, manifest: Manifest) -> Manifest:
        """``manifest`` with each blob's holders; called from a worker thread (it waits on
        the event loop). Without Redis, or on the loop itself, this node alone."""
        blobs = [blob.sha256 for blob in manifest.blobs]
        holders: dict[str, list[str]] = {}
        loop = self._loop
        # (known unreachable: this node alone at once, not a manifest that waits on timeouts)
        if blobs and loop is not None and not _on_loop(loop) and self.membership.reachable:
            future = asyncio.run_coroutine_threadsafe(self.holders(blobs), loop)
            try:
                holders = future.result(timeout=self.settings.redis_timeout_s * 3)
            except (RegionError, TimeoutError) as exc:
                future.cancel()
                emit("region.holders_unavailable", level=logging.WARNING, error=repr(exc))
        manifest.blobs = [
            blob.model_copy(update={"nodes": holders.get(blob.sha256) or [self.blob_url]})
            for blob in manifest.blobs
        ]
        return manifest

    async def info(self, tenant: str) -> RegionInfo:
        """``GET /v1/region`` for ``tenant``: live nodes, and where its pipelines are whole."""
        records = await anyio.to_thread.run_sync(lambda: self.node.records(tenant))
        try:
            blobs = sorted({b for r in records for b in r.weight_blobs()})
            holders, live = await self.holder_ids(blobs)
        except RegionError:
            return await single_node_info(self.node, tenant, connected=None)
        pipelines = []
        for record in records:
            own = list(record.weight_blobs())
            whole = set.intersection(*(set(holders[b]) for b in own)) if own else set()
            pipelines.append(RegionPipeline(tenant=record.tenant, id=record.id,
                                            copies=len(whole), nodes=sorted(whole)))
        return RegionInfo(region=self.region, connected=True,
                          nodes=[_region_node(n) for n in live.values()], pipelines=pipelines)


async def single_node_info(
    node: CacheNode, tenant: str, *, connected: bool | None = False
) -> RegionInfo:
    """``GET /v1/region`` of a node outside a region (or cut off from it): itself alone."""

    def build() -> RegionInfo:
        usage = node.store.usage()
        settings = node.settings
        whole = [
            (r, bool(r.weight_blobs()) and all(node.store.has(b) for b in r.weight_blobs()))
            for r in node.records(tenant)
        ]
        pipelines = [
            RegionPipeline(tenant=r.tenant, id=r.id, copies=int(here),
                           nodes=[settings.node_id] if here else [])
            for r, here in whole
        ]
        url = settings.regional.advertise_url or _serving_url(settings)
        me = RegionNode(node_id=settings.node_id, url=url, data_url=settings.data_url,
                        state="ready", capacity=usage.capacity, used=usage.committed,
                        free=usage.free)
        return RegionInfo(region=settings.region, connected=connected, nodes=[me],
                          pipelines=pipelines)

    return await anyio.to_thread.run_sync(build)


def _serving_url(settings: NodeSettings) -> str:
    """The address the node serves on, as peers can reach it (a wildcard bind: the host's
    name, as ``serve`` does for the data plane's URL)."""
    wildcard = settings.host in ("0.0.0.0", "::", "")
    return f"http://{socket.getfqdn() if wildcard else settings.host}:{settings.port}"


def _blob_url(record: NodeRecord) -> str:
    return (record.data_url or record.url).rstrip("/")


def _region_node(record: NodeRecord) -> RegionNode:
    return RegionNode(node_id=record.node_id, url=record.url, data_url=record.data_url,
                      state=record.state, capacity=record.capacity, used=record.used,
                      free=record.free, last_heartbeat=record.last_heartbeat)


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False
