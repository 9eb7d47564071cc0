"""The cache node service: a facade over the collaborators that keep pipelines from
registration to warm, and answer replicas (manifests, leases, blob access).

Routes call these methods and nothing else; every method takes the caller's tenant first, and a
pipeline of another tenant is indistinguishable from a missing one (I7). The wire views of what
they return are built in ``api.views``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio

from api.schema import Lease, Manifest, PipelineFile, PipelineSpec
from cache_node import restage
from cache_node.access import TenantAccess
from cache_node.captures import Captures
from cache_node.collector import Collector
from cache_node.disk import DiskGuard
from cache_node.errors import Conflict, NotFound, WeightCacheError
from cache_node.events import emit
from cache_node.evictor import Evictor
from cache_node.fetch import Fetcher
from cache_node.load_history import LoadHistory
from cache_node.manifests import ManifestBuilder
from cache_node.metadata import KeyValue, open_metadata
from cache_node.metrics import NodeMetrics
from cache_node.pipelines import PipelineBook, validate_spec
from cache_node.registry import PipelineRecord, Registry, staged_job_key
from cache_node.settings import NodeSettings
from cache_node.shard_sets import is_current as shard_set_is_current
from cache_node.snapshots import snapshots
from cache_node.store import BlobRecord, BlobStore
from cache_node.tasks import TaskOwner
from cache_node.tenants import ADMIN_TENANT
from cache_node.warm_prepare import WarmPreparer
from cache_node.warming import WarmJobs

if TYPE_CHECKING:
    from cache_node.region.node_region import NodeRegion

log = logging.getLogger("weightcache.node")

VERSION = "0.1.0"
#: How often the node carries out workers' quarantine requests and restores disk headroom.
_HOUSEKEEPING_S = 0.5


class CacheNode:
    """One cache node: store, registry, warm jobs and eviction, wired together."""

    def __init__(self, settings: NodeSettings, *, meta: KeyValue | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.access = TenantAccess(settings)  # the tokens file: tenants, sources, credentials
        self.metrics = NodeMetrics()
        self.disk = DiskGuard(
            settings.data_dir,
            headroom=settings.disk_headroom,
            on_full=self.metrics.disk_full.inc,
        )
        self.disk.ensure_ballast()
        self.meta = meta or open_metadata(settings.data_dir / "meta", self.disk)
        self.store = BlobStore(
            settings.data_dir,
            capacity=settings.capacity,
            meta=self.meta,
            on_quarantine=self._on_quarantine,
            disk=self.disk,
        )
        self.registry = Registry(self.meta)
        self.book = PipelineBook(self.registry)
        self.fetcher = Fetcher(self.store, settings.fetch, metrics=self.metrics)
        self.load_history = LoadHistory(self.meta, self.metrics)
        self.manifests = ManifestBuilder(self.store)
        self.tasks = TaskOwner()
        # one registration or promotion decides what a pipeline's record becomes at a time
        self._registration_lock = asyncio.Lock()
        self.collector = Collector(
            registry=self.registry,
            store=self.store,
            fetcher=self.fetcher,
            # a capture's blob is unreferenced from its publish until its record is written
            jobs_running=lambda: self.tasks.has_jobs() or self.captures.committing > 0,
            on_change=self.refresh_gauges,
        )
        self.evictor = Evictor(
            self.registry, self.store, settings.eviction, evict=self._evict_record
        )
        self.store.make_room = self.make_room
        self.captures = Captures(
            book=self.book,
            registry=self.registry,
            store=self.store,
            collector=self.collector,
            evictor=self.evictor,
            settings=settings.captures,
            metrics=self.metrics,
            on_change=self.refresh_gauges,
        )
        self.warming = WarmJobs(
            book=self.book,
            registry=self.registry,
            store=self.store,
            fetcher=self.fetcher,
            manifests=self.manifests,
            preparer=WarmPreparer(
                access=self.access,
                book=self.book,
                registry=self.registry,
                store=self.store,
                fetcher=self.fetcher,
                evictor=self.evictor,
            ),
            collector=self.collector,
            tasks=self.tasks,
            metrics=self.metrics,
            retry_settings=settings.retry,
            registration_lock=self._registration_lock,
            on_change=self.refresh_gauges,
        )
        #: The node's part in a region (``--redis``); None: a node on its own, as ever.
        self.region: NodeRegion | None = None
        if settings.redis_url is not None:
            from cache_node.region.node_region import NodeRegion  # it imports this module

            self.region = NodeRegion(self)

    @property
    def tokens(self) -> dict[str, str] | None:
        """Token → tenant as the tokens file says now (it is re-read when it changes)."""
        return self.access.tokens

    @property
    def auth_enabled(self) -> bool:
        return self.tokens is not None

    def _on_quarantine(self, sha256: str, reason: str) -> None:
        # A capture whose blob failed is dropped, its pipeline stays warm; a pipeline file or
        # shard that failed makes its pipeline cold and re-warms it (warming).
        self.captures.forget_blob(sha256)
        self.warming.on_quarantine(sha256, reason)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Reconcile disk with metadata, then resume the pipelines that were warming."""
        await anyio.to_thread.run_sync(self.registry.ensure_indexes)
        report = await anyio.to_thread.run_sync(lambda: self.store.check(fix=True))
        self.tasks.bind(asyncio.get_running_loop())
        self.collector.collect_orphans()  # before any job: left by transfers of pipelines now gone
        self.fetcher.verified.sweep()  # facts about blobs reconcile removed or quarantined
        self.captures.prune_missing()  # captures whose blob reconcile found missing or bad
        if report.missing or report.quarantined or report.orphans_removed:
            log.warning("start-up reconcile: %s", report)
        for record in list(self.registry.all()):
            if record.state == "warm" and not self._blobs_present(record):
                record.state = "cold"
                self.book.save(record)
            if record.state == "warm":  # warmed by a version that did not check checkpoints
                await self.warming.recheck_checkpoint(record)
            if record.state in ("warming", "cold") and record.error is None:
                with contextlib.suppress(WeightCacheError):
                    await self.warming.start(record)
            pending = record.pending
            if pending is not None and pending.state == "warming":
                with contextlib.suppress(WeightCacheError):
                    await self.warming.start(pending)
        self.refresh_gauges()
        self.tasks.spawn(self._watermark_loop(), name="watermarks")
        # failed pipelines whose retry_at passed while the node was down are retried now
        self.tasks.spawn(self.warming.retries.run(), name="retries")
        self.tasks.spawn(self._housekeeping_loop(), name="housekeeping")
        if self.region is not None:
            await self.region.start()

    async def _housekeeping_loop(self) -> None:
        """Twice a second: carry out the quarantines the data-plane workers ask for (they only
        read the store: the blob goes aside, its pipelines go cold and re-warm, the accounting
        follows), and give a disk that was full its headroom back as soon as it has room, so
        that a disk filling again soon after still leaves room to record deletions and leases."""
        while True:
            await asyncio.sleep(_HOUSEKEEPING_S)
            try:
                await anyio.to_thread.run_sync(self.store.serve_quarantine_requests)
                await anyio.to_thread.run_sync(self.disk.problems)
            except Exception:  # the loop must outlive one bad pass
                log.exception("housekeeping pass failed")

    async def stop(self) -> None:
        """Stop every task the node started (jobs, loops, re-warms), let origins close, and
        close the metadata."""
        self.tasks.cancel_all()
        self.fetcher.cancel_all()
        await self.tasks.stop()
        if self.region is not None:  # after the fills: a leader's cancelled one frees its lease
            await self.fetcher.wait_ended()
            await self.region.stop()
        self.meta.close()

    # ------------------------------------------------------------------ auth
    def tenant_for(self, token: str | None) -> str | None:
        """The tenant a bearer token belongs to; None when it is missing or unknown."""
        return self.access.tenant_for(token)

    # ------------------------------------------------------------------ pipelines
    def record(self, tenant: str, pipeline_id: str) -> PipelineRecord:
        """``tenant``'s pipeline (NotFound for another tenant's, I7)."""
        return self.book.find(tenant, pipeline_id)

    def records(self, tenant: str) -> list[PipelineRecord]:
        """The pipelines ``tenant`` sees (the admin sees all), by tenant and id."""
        # Another tenant's pipelines are not even read: the cost is the caller's own (I7).
        records = self.registry.all() if tenant == ADMIN_TENANT else self.registry.of_tenant(tenant)
        return sorted(
            (r for r in records if tenant in (r.tenant, ADMIN_TENANT)),
            key=lambda r: (r.tenant, r.id),
        )

    async def register(
        self, tenant: str, pipeline_id: str, spec: PipelineSpec
    ) -> tuple[PipelineRecord, bool]:
        """Upsert a pipeline and start its pre-warm. Returns (its record, changed)."""
        validate_spec(spec)
        for model in spec.models:  # a bad source is a 400, a forbidden one a 403, up front
            self.access.check_source(tenant, model, pipeline=pipeline_id)
        async with self._registration_lock:
            existing = self.registry.get(tenant, pipeline_id)
            if existing is not None and existing.state == "warm":
                # the warm version keeps serving; the new spec fills beside it (restage)
                staged, changed = self._stage(existing, spec)
                if staged is None:
                    return existing, changed
                record = staged
            elif (
                existing is not None
                and existing.spec == spec
                and existing.state in ("warm", "warming")
            ):
                return existing, False
            else:
                record = self._replace(existing, tenant, pipeline_id, spec)
        emit("pipeline.registered", tenant=tenant, pipeline=pipeline_id,
             generation=record.generation, models=len(spec.models), tp_sizes=spec.tp_sizes,
             staged=record.staged)
        if self.region is not None:  # the region's catalogue: registering here warms it all
            await self.region.registered(tenant, pipeline_id, spec)
        await self.warming.start(record)
        # A DELETE may have landed since: the registration still happened (the DELETE came
        # after it), so the answer is what it registered, never a 404.
        current = self.registry.get(tenant, pipeline_id)
        return (current if current is not None else record), True

    def _replace(
        self, existing: PipelineRecord | None, tenant: str, pipeline_id: str, spec: PipelineSpec
    ) -> PipelineRecord:
        """A new record of ``spec`` in place of a pipeline that is not warm (a staged
        re-registration beside it, if any, goes too: this spec is the newest)."""
        record = PipelineRecord(id=pipeline_id, tenant=tenant, spec=spec)
        if existing is not None:
            record.registered_at = existing.registered_at
            record.last_used_at = existing.last_used_at
            record.generation = existing.generation + 1
            if existing.pending is not None:
                self.warming.cancel(staged_job_key(existing.key))
                record.generation = max(record.generation, existing.pending.generation + 1)
            if existing.spec.models == spec.models:
                record.models = existing.models
        self.book.save(record, with_pending=True)
        return record

    def _stage(
        self, existing: PipelineRecord, spec: PipelineSpec
    ) -> tuple[PipelineRecord | None, bool]:
        """Stage ``spec`` beside the warm ``existing``: (the staged record, changed). None when
        there is nothing to fill: the spec already filling (unchanged), or the warm spec again
        (changed if a staged attempt was dropped)."""
        pending = existing.pending
        if pending is not None and pending.spec == spec and pending.state == "warming":
            return None, False
        if pending is not None:
            self.warming.cancel(staged_job_key(existing.key))
        if existing.spec == spec:
            if pending is not None:
                existing.pending = None
                self.book.save(existing, with_pending=True)
                emit("pipeline.registration_dropped", tenant=existing.tenant,
                     pipeline=existing.id, generation=pending.generation)
                self.collector.collect_orphans()
            return None, pending is not None
        attempt = restage.stage(existing, spec)
        existing.pending = attempt
        self.book.save(existing, with_pending=True)
        return attempt, True

    def set_pinned(self, tenant: str, pipeline_id: str, *, pinned: bool) -> PipelineRecord:
        """Pin (never evicted) or unpin a pipeline, in place: not a re-registration, so
        nothing is resolved or fetched and a warm job running goes on (restage.set_pinned)."""
        record = self.book.find(tenant, pipeline_id)
        if restage.set_pinned(record, pinned=pinned):
            self.book.save(record, with_pending=True)
            emit("pipeline.pinned" if pinned else "pipeline.unpinned",
                 tenant=record.tenant, pipeline=record.id)
        return record

    async def warm(self, tenant: str, pipeline_id: str) -> PipelineRecord:
        """Re-warm after eviction or failure (now, whatever ``retry_at`` says); a no-op for a
        warm or warming pipeline, except that a failed re-registration beside a warm one is
        tried again. A person asking starts the backoff afresh."""
        record = self.book.find(tenant, pipeline_id)
        target = record
        if record.state == "warm" and record.pending is not None:
            target = record.pending
        if target.state not in ("warm", "warming"):
            target.failures = 0
            await self.warming.start(target)
        return self.book.find(record.tenant, record.id)

    async def delete(self, tenant: str, pipeline_id: str) -> None:
        """Forget a pipeline and free the bytes no other pipeline references."""
        record = self.book.find(tenant, pipeline_id)
        self.warming.cancel(record.key)
        self.warming.cancel(staged_job_key(record.key))
        self.registry.delete(record.tenant, record.id)
        self.load_history.forget(record.tenant, record.id)
        await anyio.to_thread.run_sync(lambda: self.collector.free_unreferenced(record.blobs()))
        self.refresh_gauges()
        emit("pipeline.deleted", tenant=record.tenant, pipeline=record.id)
        if self.region is not None:
            await self.region.registered(record.tenant, record.id, None)

    async def evict(self, tenant: str, pipeline_id: str, *, reason: str = "manual") -> int:
        """Free a pipeline's bytes (those not shared with pipelines that stay). Returns bytes."""
        record = self.book.find(tenant, pipeline_id)
        if self.registry.leases_of(record.tenant, record.id):
            raise Conflict(f"pipeline {pipeline_id!r} is leased by a loading replica")
        return await anyio.to_thread.run_sync(lambda: self._evict_record(record, reason))

    def _evict_record(self, record: PipelineRecord, reason: str) -> int:
        self.warming.cancel(record.key)
        self.warming.cancel(staged_job_key(record.key))
        blobs = self.book.mark_evicted(record, reason)
        freed = self.collector.free_unreferenced(blobs)
        self.metrics.evictions.labels(reason).inc()
        self.metrics.evicted_bytes.labels(reason).inc(freed)
        self.refresh_gauges()
        emit("pipeline.evicted", tenant=record.tenant, pipeline=record.id, reason=reason,
             bytes_freed=freed)
        return freed

    # ------------------------------------------------------------------ eviction
    def make_room(self, nbytes: int) -> int:
        """Evict by the policy so ``nbytes`` more fit (the store's hook). Returns bytes freed."""
        return self.evictor.make_room(nbytes)

    def enforce_watermarks(self) -> int:
        """Above the high watermark, evict cold pipelines down to the low one. Returns bytes."""
        return self.evictor.enforce_watermarks()

    async def _watermark_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.eviction.interval_s)
            try:
                # a disk that was full gets its headroom back here too, not only on /readyz
                await anyio.to_thread.run_sync(self.disk.problems)
                await anyio.to_thread.run_sync(self.enforce_watermarks)
            except Exception:  # the loop must outlive one bad pass
                log.exception("watermark pass failed")

    def _blobs_present(self, record: PipelineRecord) -> bool:
        return all(
            f.blob is not None and self.store.has(f.blob) for m in record.models for f in m.files
        ) and all(
            shard_set_is_current(s) and all(self.store.has(r.blob) for r in s.ranks)
            for s in record.shards.values()
        )

    # ------------------------------------------------------------------ status
    def readiness_problems(self) -> list[str]:
        """What keeps the node from being ready (``disk_full``); empty when it is."""
        return self.disk.problems()

    def refresh_gauges(self) -> None:
        """Bring the byte and pipeline gauges up to date (after a change, before a scrape)."""
        self.metrics.show(self.store.usage(), [r.state for r in self.registry.all()])

    # ------------------------------------------------------------------ replica side
    def manifest(self, tenant: str, pipeline_id: str, *, tp_size: int, rank: int) -> Manifest:
        """What rank ``rank`` of a TP-``tp_size`` replica reads; counts as a use."""
        record = self.book.find_warm(tenant, pipeline_id)
        manifest = self.manifests.build(record, tp_size=tp_size, rank=rank)
        manifest.snapshots = snapshots(record)
        if self.region is not None:  # each blob's holders in the region
            manifest = self.region.with_holders(manifest)
        record.last_used_at = time.time()
        record.loads += 1
        self.book.save(record)
        return manifest

    def files(self, tenant: str, pipeline_id: str) -> list[PipelineFile]:
        """Every origin file of a warm pipeline with its blob (to materialise it on disk)."""
        record = self.book.find_warm(tenant, pipeline_id)
        return self.manifests.files(record)

    def create_lease(self, tenant: str, pipeline_id: str) -> Lease:
        record = self.book.find(tenant, pipeline_id)
        lease = self.registry.create_lease(
            record.tenant,
            record.id,
            ttl_s=self.settings.lease_ttl_s,
            limit=self.settings.limits.leases_per_tenant,
        )
        return Lease(lease_id=lease.lease_id, expires_at=lease.expires_at)

    def renew_lease(self, tenant: str, lease_id: str) -> Lease:
        lease = self.registry.get_lease(lease_id)
        if lease is None or tenant not in (lease.tenant, ADMIN_TENANT):
            raise NotFound("no such lease")
        renewed = self.registry.renew_lease(lease, ttl_s=self.settings.lease_ttl_s)
        return Lease(lease_id=renewed.lease_id, expires_at=renewed.expires_at)

    def release_lease(self, tenant: str, lease_id: str) -> None:
        lease = self.registry.get_lease(lease_id)
        if lease is None or tenant not in (lease.tenant, ADMIN_TENANT):
            raise NotFound("no such lease")
        self.registry.delete_lease(lease_id)
        record = self.registry.get(lease.tenant, lease.pipeline)
        if record is not None:  # the last pre-swap lease of a re-registered one frees bytes
            self.collector.free_retired_of(record)

    def authorize_blob(self, tenant: str, sha256: str) -> BlobRecord:
        """The blob's record if a pipeline of ``tenant`` references it; NotFound otherwise (I7).

        One read of the registry's blob index, however many pipelines the node holds.
        """
        tenants = self.registry.blob_tenants(sha256)
        blob = self.store.get(sha256)
        if blob is None or not (tenant in tenants or (tenant == ADMIN_TENANT and tenants)):
            raise NotFound(f"no blob {sha256}")
        return blob

    def iter_blob(
        self, sha256: str, start: int, end: int, *, piece_size: int = 8 << 20
    ) -> Iterator[bytes]:
        """Verified bytes ``[start, end)`` of a blob (I2), ``piece_size`` bytes at a time."""
        for data in self.store.iter_verified(sha256, start, end, piece_size=piece_size):
            self.metrics.bytes_served.inc(len(data))
            yield data
