"""The cache node service: pipelines from registration to warm, manifests, leases, blob access.

Routes call these methods and nothing else; every method takes the caller's tenant first, and a
pipeline of another tenant is indistinguishable from a missing one (I7).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import anyio

from api.schema import (
    Lease,
    Manifest,
    ModelSpec,
    NodeInfo,
    PipelineFile,
    PipelineSpec,
    PipelineStatus,
)
from cache_node import restage
from cache_node.access import TenantAccess
from cache_node.checkpoint_check import check_checkpoint, check_file_list
from cache_node.disk import DiskGuard
from cache_node.errors import (
    AmbiguousPipeline,
    Conflict,
    InsufficientStorage,
    IntegrityError,
    InvalidCheckpoint,
    InvalidInput,
    NotFound,
    NotWarm,
    OriginError,
    WeightCacheError,
)
from cache_node.events import emit
from cache_node.evictor import Evictor
from cache_node.fetch import Fetcher, transfer_key
from cache_node.load_history import LoadHistory
from cache_node.manifests import ManifestBuilder
from cache_node.metadata import KeyValue, open_metadata
from cache_node.metrics import NodeMetrics
from cache_node.origins import Origin, open_origin
from cache_node.origins.base import Snapshot
from cache_node.origins.patterns import without_excluded
from cache_node.registry import (
    FileEntry,
    ModelEntry,
    PipelineRecord,
    Registry,
    ShardSet,
    staged_job_key,
)
from cache_node.retry import RetryScheduler, RetryTarget, failure_info, scheduled_error
from cache_node.settings import NodeSettings
from cache_node.shard_headers import ReadAheadSkipped, exact_shard_bytes_ahead
from cache_node.shard_sets import is_current as shard_set_is_current
from cache_node.shard_sets import write_shard_set
from cache_node.shard_space import ShardNeed, find_reusable, shard_bytes_to_reserve
from cache_node.store import BlobRecord, BlobStore, Reservation
from cache_node.tasks import run_all
from cache_node.tenants import ADMIN_TENANT, DEFAULT_TENANT
from loader.errors import HeaderError

log = logging.getLogger("weightcache.node")

VERSION = "0.1.0"
_FILES_AT_ONCE = 4
_FILL_ROUNDS = 3
#: How often the node carries out workers' quarantine requests and restores disk headroom.
_HOUSEKEEPING_S = 0.5


@dataclass
class _Prepared:
    """What the pre-warm resolved and reserved before any origin byte moved."""

    record: PipelineRecord
    origins: list[Origin]
    reservations: dict[str, Reservation]  # transfer key → space held for it
    shard_reservation: Reservation | None = None  # the TP shard sets' space (I5)
    finished: bool = False  # its job released all of the above
    shard_need: ShardNeed = ShardNeed()  # what the shard reservation holds, and how known
    held: dict[tuple[str, str], str] | None = None  # files found on disk (model, path) → blob


class CacheNode:
    """One cache node: store, fetcher, registry and the warm jobs that tie them together."""

    def __init__(self, settings: NodeSettings, *, meta: KeyValue | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.access = TenantAccess(settings)  # the tokens file: tenants, sources, credentials
        self.tokens = self.access.tokens
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
        # One registration computes and takes its reservations at a time: two of one model
        # must not both reserve its files (the second sees the first's, I5)
        self._reserve_lock = threading.Lock()
        self.registry = Registry(self.meta)
        self.fetcher = Fetcher(self.store, settings.fetch, metrics=self.metrics)
        self.load_history = LoadHistory(self.meta, self.metrics)
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, dict[str, int]] = {}  # pipeline key → path → bytes in flight
        self._blob_tenants: dict[str, set[str]] | None = None
        self.manifests = ManifestBuilder(self.store)
        self._lock = asyncio.Lock()
        self._shard_locks: dict[tuple[object, ...], tuple[asyncio.Lock, int]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._resolving: dict[tuple[object, ...], asyncio.Task[Snapshot]] = {}
        self._watermark_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(); for other threads
        self._rewarming: set[asyncio.Task[None]] = set()
        self.evictor = Evictor(
            self.registry, self.store, settings.eviction, evict=self._evict_record
        )
        self.store.make_room = self.make_room
        self.retries = RetryScheduler(
            settings.retry,
            records=self.registry.all,
            retry=self._retry,
            clock=time.time,
            each_pass=self._free_retired,
        )
        self._retry_task: asyncio.Task[None] | None = None
        self._quarantine_task: asyncio.Task[None] | None = None

    @property
    def auth_enabled(self) -> bool:
        return self.tokens is not None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Reconcile disk with metadata, then resume the pipelines that were warming."""
        await anyio.to_thread.run_sync(self.registry.ensure_indexes)
        report = await anyio.to_thread.run_sync(lambda: self.store.check(fix=True))
        self._loop = asyncio.get_running_loop()
        self._collect_orphans()  # before any job: left by transfers of pipelines now gone
        self.fetcher.verified.sweep()  # facts about blobs reconcile removed or quarantined
        if report.missing or report.quarantined or report.orphans_removed:
            log.warning("start-up reconcile: %s", report)
        for record in list(self.registry.all()):
            if record.state == "warm" and not self._blobs_present(record):
                record.state = "cold"
                self._save(record)
            if record.state == "warm":  # warmed by a version that did not check checkpoints
                await self._recheck_checkpoint(record)
            if record.state in ("warming", "cold") and record.error is None:
                with contextlib.suppress(WeightCacheError):
                    await self._start_warm(record)
            pending = record.pending
            if pending is not None and pending.state == "warming":
                with contextlib.suppress(WeightCacheError):
                    await self._start_warm(pending)
        self._update_gauges()
        self._watermark_task = asyncio.create_task(self._watermark_loop(), name="watermarks")
        # failed pipelines whose retry_at passed while the node was down are retried now
        self._retry_task = asyncio.create_task(self.retries.run(), name="retries")
        self._quarantine_task = asyncio.create_task(
            self._housekeeping_loop(), name="housekeeping"
        )

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
        if self._watermark_task is not None:
            self._watermark_task.cancel()
        if self._retry_task is not None:
            self._retry_task.cancel()
        if self._quarantine_task is not None:
            self._quarantine_task.cancel()
        for task in list(self._jobs.values()) + list(self._rewarming):
            task.cancel()
        self.fetcher.cancel_all()
        for task in list(self._jobs.values()) + list(self._closing):
            with contextlib.suppress(BaseException):
                await task
        self.meta.close()

    # ------------------------------------------------------------------ auth
    def tenant_for(self, token: str | None) -> str | None:
        """The tenant a bearer token belongs to; None when it is missing or unknown."""
        if self.tokens is None:
            return DEFAULT_TENANT
        if token is None:
            return None
        return self.tokens.get(token)

    # ------------------------------------------------------------------ pipelines
    def _find(self, tenant: str, pipeline_id: str) -> PipelineRecord:
        record = self.registry.get(tenant, pipeline_id)
        if record is None and tenant == ADMIN_TENANT:
            matches = self.registry.by_id(pipeline_id)
            if len(matches) == 1:
                record = matches[0]
            elif matches:  # never pick one: admin says which with ?tenant=
                tenants = sorted(r.tenant for r in matches)
                raise AmbiguousPipeline(
                    f"pipeline {pipeline_id!r} exists for tenants {', '.join(tenants)}: "
                    "name one with ?tenant=NAME (CLI: --tenant)",
                    pipeline=pipeline_id,
                    tenants=tenants,
                )
        if record is None:
            raise NotFound(f"no pipeline {pipeline_id!r}", pipeline=pipeline_id)
        return record

    def _save(self, record: PipelineRecord, *, with_pending: bool = False) -> None:
        """Write ``record``; a staged one into its pipeline's ``pending`` slot (if it is still
        the one there). A pipeline's own save keeps the stored ``pending`` and retired blobs
        (a job's copy of them is stale) unless ``with_pending`` says it sets them itself."""
        stored = self.registry.get(record.tenant, record.id)
        if record.staged:
            if (
                stored is None
                or stored.pending is None
                or stored.pending.generation != record.generation
            ):
                return
            record.spec.pinned = stored.pending.spec.pinned  # a pin since the job's copy
            stored.pending = record
            record = stored
        elif stored is not None and not with_pending:
            record.pending = stored.pending
            record.retired_blobs = stored.retired_blobs
            record.retired_leases = stored.retired_leases
            record.spec.pinned = stored.spec.pinned  # set_pinned: a pin since the job's copy
        self.registry.put(record)
        self._blob_tenants = None

    async def register(
        self, tenant: str, pipeline_id: str, spec: PipelineSpec
    ) -> tuple[PipelineStatus, bool]:
        """Upsert a pipeline and start its pre-warm. Returns (status, changed)."""
        _validate_spec(spec)
        for model in spec.models:  # a bad source is a 400, a forbidden one a 403, up front
            self.access.check_source(tenant, model, pipeline=pipeline_id)
        async with self._lock:
            existing = self.registry.get(tenant, pipeline_id)
            if existing is not None and existing.state == "warm":
                # the warm version keeps serving; the new spec fills beside it (restage)
                staged, changed = self._stage(existing, spec)
                if staged is None:
                    return self.status_of(existing), changed
                record = staged
            elif (
                existing is not None
                and existing.spec == spec
                and existing.state in ("warm", "warming")
            ):
                return self.status_of(existing), False
            else:
                record = self._replace(existing, tenant, pipeline_id, spec)
        emit("pipeline.registered", tenant=tenant, pipeline=pipeline_id,
             generation=record.generation, models=len(spec.models), tp_sizes=spec.tp_sizes,
             staged=record.staged)
        await self._start_warm(record)
        # A DELETE may have landed since: the registration still happened (the DELETE came
        # after it), so the answer is what it registered, never a 404.
        current = self.registry.get(tenant, pipeline_id)
        return self.status_of(current if current is not None else record), True

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
                self._cancel_job(staged_job_key(existing.key))
                record.generation = max(record.generation, existing.pending.generation + 1)
            if existing.spec.models == spec.models:
                record.models = existing.models
        self._save(record, with_pending=True)
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
            self._cancel_job(staged_job_key(existing.key))
        if existing.spec == spec:
            if pending is not None:
                existing.pending = None
                self._save(existing, with_pending=True)
                emit("pipeline.registration_dropped", tenant=existing.tenant,
                     pipeline=existing.id, generation=pending.generation)
                self._collect_orphans()
            return None, pending is not None
        attempt = restage.stage(existing, spec)
        existing.pending = attempt
        self._save(existing, with_pending=True)
        return attempt, True

    async def warm(self, tenant: str, pipeline_id: str) -> PipelineStatus:
        """Re-warm after eviction or failure (now, whatever ``retry_at`` says); a no-op for a
        warm or warming pipeline, except that a failed re-registration beside a warm one is
        tried again. A person asking starts the backoff afresh."""
        record = self._find(tenant, pipeline_id)
        target = record
        if record.state == "warm" and record.pending is not None:
            target = record.pending
        if target.state not in ("warm", "warming"):
            target.failures = 0
            await self._start_warm(target)
        return self.status(record.tenant, record.id)

    def status(self, tenant: str, pipeline_id: str) -> PipelineStatus:
        return self.status_of(self._find(tenant, pipeline_id))

    def set_pinned(self, tenant: str, pipeline_id: str, *, pinned: bool) -> PipelineStatus:
        """Pin (never evicted) or unpin a pipeline, in place: not a re-registration, so
        nothing is resolved or fetched and a warm job running goes on (restage.set_pinned)."""
        record = self._find(tenant, pipeline_id)
        if restage.set_pinned(record, pinned=pinned):
            self._save(record, with_pending=True)
            emit("pipeline.pinned" if pinned else "pipeline.unpinned",
                 tenant=record.tenant, pipeline=record.id)
        return self.status_of(record)

    def pipelines(self, tenant: str) -> list[PipelineStatus]:
        # Another tenant's pipelines are not even read: the cost is the caller's own (I7).
        records = self.registry.all() if tenant == ADMIN_TENANT else self.registry.of_tenant(tenant)
        return sorted(
            (self.status_of(r) for r in records if tenant in (r.tenant, ADMIN_TENANT)),
            key=lambda s: (s.tenant, s.id),
        )

    async def delete(self, tenant: str, pipeline_id: str) -> None:
        """Forget a pipeline and free the bytes no other pipeline references."""
        record = self._find(tenant, pipeline_id)
        self._cancel_job(record.key)
        self._cancel_job(staged_job_key(record.key))
        self.registry.delete(record.tenant, record.id)
        self.load_history.forget(record.tenant, record.id)
        self._blob_tenants = None
        await anyio.to_thread.run_sync(lambda: self._free_unreferenced(record.blobs()))
        self._update_gauges()
        emit("pipeline.deleted", tenant=record.tenant, pipeline=record.id)

    async def evict(self, tenant: str, pipeline_id: str, *, reason: str = "manual") -> int:
        """Free a pipeline's bytes (those not shared with pipelines that stay). Returns bytes."""
        record = self._find(tenant, pipeline_id)
        if self.registry.leases_of(record.tenant, record.id):
            raise Conflict(f"pipeline {pipeline_id!r} is leased by a loading replica")
        return await anyio.to_thread.run_sync(lambda: self._evict_record(record, reason))

    def _evict_record(self, record: PipelineRecord, reason: str) -> int:
        self._cancel_job(record.key)
        self._cancel_job(staged_job_key(record.key))
        blobs = record.blobs()
        restage.fold_pending(record)  # the newest registered spec is what a warm warms next
        record.retired_blobs, record.retired_leases = {}, []
        record.state = "evicted"
        record.generation += 1  # a warm job still running must not write its record back
        record.evicted_reason = reason
        record.error = None
        for model in record.models:
            for file in model.files:
                file.blob = None
        for shard_set in record.shards.values():
            shard_set.state = "pending"
            shard_set.ranks = []
        # metadata first: nothing points at a blob we are about to unlink
        self._save(record, with_pending=True)
        freed = self._free_unreferenced(blobs)
        self.metrics.evictions.labels(reason).inc()
        self.metrics.evicted_bytes.labels(reason).inc(freed)
        self._update_gauges()
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

    def _free_unreferenced(self, blobs: dict[str, int]) -> int:
        still_used: set[str] = set()
        for other in self.registry.all():
            still_used.update(other.blobs())
        freed = sum(self.store.delete(sha) for sha in blobs if sha not in still_used)
        if freed:
            self.fetcher.verified.sweep()  # facts about a freed blob go with it
        return freed

    # ------------------------------------------------------------------ warm jobs
    async def _start_warm(self, record: PipelineRecord) -> None:
        """Resolve and reserve now (so a 507 reaches the caller), then fill in the background."""
        self._cancel_job(record.job_key)
        record.state = "warming"
        record.error = None
        record.evicted_reason = None
        self._save(record)
        emit("warm.started", tenant=record.tenant, pipeline=record.id,
             generation=record.generation, staged=record.staged, attempt=record.failures + 1)
        try:
            prepared = await self._prepare(record)
        except WeightCacheError as exc:
            self._fail(record, exc)
            if isinstance(exc, InsufficientStorage | InvalidInput):
                raise
            return
        if not self._is_current(record):  # evicted, deleted or registered again meanwhile
            self._release_unused(prepared)
            for origin in prepared.origins:
                self._close_when_idle(origin)
            return
        job_key = record.job_key
        task = asyncio.create_task(self._fill(prepared), name=f"warm {job_key}")
        self._jobs[job_key] = task
        task.add_done_callback(lambda _: self._job_done(job_key, task, prepared))

    def _stored(self, record: PipelineRecord) -> PipelineRecord | None:
        """The registry's copy of ``record`` (its pipeline, or the staged re-registration
        beside it) if it is still that generation; None once evicted, deleted or replaced."""
        stored = self.registry.get(record.tenant, record.id)
        if stored is not None and record.staged:
            stored = stored.pending
        return stored if stored is not None and stored.generation == record.generation else None

    def _is_current(self, record: PipelineRecord) -> bool:
        """Whether ``record`` is still the registry's generation of its pipeline."""
        return self._stored(record) is not None

    def _release_unused(self, prepared: _Prepared) -> None:
        """Give back the space of files the job never started to fetch."""
        for key, reservation in prepared.reservations.items():
            reservation.release()
            if not self.fetcher.in_flight(key):
                self.store.release_partial(key)  # its partial, if any, counts as temp again
        prepared.reservations.clear()
        if prepared.shard_reservation is not None:
            prepared.shard_reservation.release()

    def _job_done(self, key: str, task: asyncio.Task[None], prepared: _Prepared) -> None:
        if not prepared.finished:
            # cancelled before its first step (an eviction or deletion right after the
            # registration): its body never ran, so its space and origins are let go here
            self._finish(prepared)
        if self._jobs.get(key) is task:  # not a newer job of the same pipeline
            del self._jobs[key]
        self._collect_orphans()

    def _collect_orphans(self) -> int:
        """Free the blobs no pipeline references, unless a warm job is running. Returns bytes.

        A transfer is shared and outlives a pipeline evicted or deleted while it was filling,
        so it can land as a blob nobody holds. A running job's blob is unreferenced from its
        commit until the job records it, so nothing is collected while any job runs.
        """
        if self._jobs:
            return 0
        referenced: set[str] = set()
        for record in self.registry.all():
            referenced.update(record.blobs())
        orphans = [r.sha256 for r in self.store.records() if r.sha256 not in referenced]
        freed = sum(self.store.delete(sha) for sha in orphans)
        if freed:
            log.info("freed %d bytes of %d blobs no pipeline holds", freed, len(orphans))
            self.fetcher.verified.sweep()
            self._update_gauges()
        return freed

    def _close_when_idle(self, origin: Origin) -> None:
        """Close an origin once no transfer reads from it: a pipeline that stops (failed,
        evicted, deleted) may have started a transfer other pipelines are still waiting on."""

        async def close() -> None:
            pending = self.fetcher.tasks_using(origin)
            if pending:
                await asyncio.wait(pending)
            await origin.aclose()

        task = asyncio.create_task(close(), name="close origin")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _cancel_job(self, key: str) -> None:
        task = self._jobs.pop(key, None)
        self._progress.pop(key, None)  # an evicted or deleted pipeline has nothing in flight
        if task is not None:
            loop = self._loop
            if loop is not None and not loop.is_closed() and not _on_loop(loop):
                # evictions run in worker threads; Task.cancel is not thread-safe
                loop.call_soon_threadsafe(task.cancel)
            else:
                task.cancel()

    def _fail(self, record: PipelineRecord, exc: WeightCacheError) -> None:
        if isinstance(exc, InsufficientStorage):
            self.metrics.insufficient_storage.inc()
        current = self._stored(record)
        if current is None:
            return
        record = current
        record.state = "failed"
        record.failures += 1
        record.error = failure_info(
            exc, failures=record.failures, settings=self.settings.retry, now=time.time()
        )
        self._save(record)
        self.metrics.warm_failures.labels(exc.code).inc()
        if isinstance(exc, InvalidCheckpoint):
            self.metrics.invalid_checkpoints.labels(exc.code).inc()
        emit("warm.failed", level=logging.WARNING, tenant=record.tenant, pipeline=record.id,
             code=exc.code, message=exc.message, retry_at=record.error.retry_at,
             attempts=record.failures, staged=record.staged, action=record.error.action)
        if record.error.retry_at is not None:
            self.metrics.warm_retries.labels("scheduled").inc()
            emit("warm.retry_scheduled", tenant=record.tenant, pipeline=record.id,
                 code=exc.code, retry_at=record.error.retry_at, attempts=record.failures,
                 staged=record.staged)
            self.retries.wake()
        self._progress.pop(record.job_key, None)
        self._collect_orphans()  # a failed re-registration leaves the old version's blobs
        self._update_gauges()

    async def _prepare(self, record: PipelineRecord) -> _Prepared:
        for model in record.spec.models:  # the tokens file may have changed since
            self.access.check_source(record.tenant, model, pipeline=record.id)
        settings = self.access.settings_for(record.tenant)  # the tenant's own credentials
        origins = [
            open_origin(m, settings, auth_enabled=self.auth_enabled) for m in record.spec.models
        ]
        prepared: _Prepared | None = None
        try:
            models = []
            for model, origin in zip(record.spec.models, origins, strict=True):
                snapshot = await self._resolve(model, origin)
                # a source without loadable weights fails here, before any origin byte
                check_file_list(model.name, (f.path for f in snapshot.files))
                previous = self._verified_blobs(record, model, origin, snapshot)
                models.append(
                    ModelEntry(
                        name=model.name,
                        source=model.source,
                        revision=snapshot.revision,
                        files=[
                            FileEntry(
                                path=f.path,
                                size=f.size,
                                sha256=f.sha256,
                                git_sha1=f.git_sha1,
                                md5=f.md5,
                                etag=f.etag,
                                blob=previous.get((f.path, f.size, f.sha256, f.etag)),
                                verified=f.has_digest,
                            )
                            for f in snapshot.files
                        ],
                    )
                )
            record.models = models
            if self._is_current(record):  # an eviction or deletion meanwhile wins
                self._save(record)
            prepared = _Prepared(record, origins, {})
            await anyio.to_thread.run_sync(lambda: self._reserve(prepared))
        except BaseException:
            if prepared is not None:  # a cancelled request: what the thread reserved goes back
                self._release_unused(prepared)
            for origin in origins:
                await origin.aclose()
            raise
        return prepared

    def _verified_blobs(
        self, record: PipelineRecord, model: ModelSpec, origin: Origin, snapshot: Snapshot
    ) -> dict[tuple[str, int, str | None, str | None], str | None]:
        """The blobs the pipeline already held for ``model``'s files, kept only where this
        node verified that very object in ``origin``'s scope (the scope may have changed)."""
        previous: dict[tuple[str, int, str | None, str | None], str | None] = {}
        for entry in record.models:
            if entry.name != model.name:
                continue
            for file in entry.files:
                known = self.fetcher.already_verified(
                    origin, file.origin_file(), source=model.source, revision=snapshot.revision
                )
                if known is not None and known.sha256 == file.blob:
                    previous[(file.path, file.size, file.sha256, file.etag)] = file.blob
        return previous

    async def _resolve(self, model: ModelSpec, origin: Origin) -> Snapshot:
        """Resolve a source, sharing a resolution already in flight (a burst of registrations
        of one model asks the origin once)."""
        key = (origin.scope, model.source, model.revision, tuple(model.include or ()))
        task = self._resolving.get(key)
        if task is None:
            task = asyncio.create_task(origin.resolve())
            self._resolving[key] = task
            task.add_done_callback(lambda _: self._resolving.pop(key, None))
        snapshot = await asyncio.shield(task)
        origin.pin(snapshot)
        if model.exclude:
            kept = set(without_excluded([f.path for f in snapshot.files], model.exclude))
            snapshot = dataclasses.replace(
                snapshot, files=tuple(f for f in snapshot.files if f.path in kept)
            )
        return snapshot

    def _reserve(self, prepared: _Prepared) -> None:
        """Hold the space of every file still to fetch and of the TP shard sets still to
        write, all before the first origin byte (I5). Only physical need counts: a file on
        disk, in flight or reserved by another job, and a shard set already written, cost
        nothing."""
        with self._reserve_lock:
            self._reserve_locked(prepared)

    def _reserve_locked(self, prepared: _Prepared) -> None:
        record, origins = prepared.record, prepared.origins
        needed: dict[str, int] = {}
        held: dict[tuple[str, str], str] = {}  # files on disk already, for the shard sizing
        for model, origin in zip(record.models, origins, strict=True):
            for file in model.files:
                if file.blob and self.store.has(file.blob):
                    continue
                origin_file = file.origin_file()
                revision = model.revision or ""
                verified = self.fetcher.already_verified(
                    origin, origin_file, source=model.source, revision=revision
                )
                if verified is not None:
                    # this object was verified here in this scope: no bytes to fetch
                    held[(model.name, file.path)] = verified.sha256
                    continue
                key = transfer_key(origin, model.source, revision, origin_file)
                if not self.fetcher.in_flight(key) and not self.store.is_reserved(key):
                    needed[key] = file.size
        prepared.held = held
        prepared.shard_need = shard_bytes_to_reserve(self.registry, self.store, record, held)
        shard_bytes = prepared.shard_need.total
        total = sum(needed.values()) + shard_bytes
        if total > self.store.capacity:
            raise InsufficientStorage(
                f"pipeline needs {total} bytes ({shard_bytes} of them for TP shard sets) but "
                f"the node's capacity is {self.store.capacity}",
                needed=total,
                shard_bytes=shard_bytes,
                capacity=self.store.capacity,
            )
        # the blobs this pipeline will use as they are: evicting their holders frees nothing
        self._make_room_for(needed, shard_bytes, keep=frozenset(held.values()))
        reservations: dict[str, Reservation] = {}
        shards: Reservation | None = None
        try:
            for key, size in needed.items():
                reservations[key] = self.store.reserve(size, partial_key=key)
            if shard_bytes:
                shards = self.store.reserve(shard_bytes)
        except InsufficientStorage:
            for reservation in reservations.values():
                reservation.release()
            for key in reservations:
                self.store.release_partial(key)
            raise
        prepared.reservations = reservations
        prepared.shard_reservation = shards

    async def _true_up_shards(self, prepared: _Prepared) -> None:
        """Replace the shard sets' estimate by their exact size, read ahead from the headers,
        before the first weight byte (see ``cache_node.shard_headers``)."""
        need, estimate = prepared.shard_need, prepared.shard_reservation
        if not need.estimated or estimate is None:
            return
        record = prepared.record
        try:
            exact = await exact_shard_bytes_ahead(
                self.store, record, prepared.origins, prepared.held or {}, need.estimated
            )
        except (ReadAheadSkipped, OriginError, HeaderError, OSError) as exc:
            emit("shards.estimated", level=logging.WARNING, tenant=record.tenant,
                 pipeline=record.id, estimate=need.estimate, reason=str(exc))
            return  # the estimate stands; the exact size is carved when the shards are written
        exact_total = need.known + exact

        def swap() -> None:
            # in the thread, so a cancellation meanwhile cannot lose the new reservation
            prepared.shard_reservation = self.store.carve(estimate, exact_total)
            estimate.release()  # what the estimate held beyond the exact size goes back now

        await anyio.to_thread.run_sync(swap)

    def _make_room_for(
        self, needed: dict[str, int], shard_bytes: int = 0, keep: frozenset[str] = frozenset()
    ) -> None:
        """Evict for all of ``needed`` at once, or fail having evicted nothing.

        Reserving file by file would make room for the first files and then fail on a later
        one, throwing warm pipelines away for nothing. A file's own idle partial (a transfer
        to resume) is counted as temp now and stops counting once its reservation is made.
        """
        own_partials = 0
        for key in needed:
            with contextlib.suppress(FileNotFoundError):
                own_partials += self.store.partial_path(key).stat().st_size
        extra = sum(needed.values()) + shard_bytes - own_partials
        if extra <= self.store.usage().free:
            return
        self.evictor.make_room(extra, keep=keep)
        if extra > self.store.usage().free:
            raise self.store.not_enough_space(extra, "the pipeline needs")

    async def _fill(self, prepared: _Prepared) -> None:
        record = prepared.record
        self._progress.setdefault(record.job_key, {})
        limiter = anyio.CapacityLimiter(_FILES_AT_ONCE)
        try:
            await self._true_up_shards(prepared)
            for _ in range(_FILL_ROUNDS):
                await run_all(
                    self._fill_file(record, model, origin, file, prepared, limiter)
                    for model, origin in zip(record.models, prepared.origins, strict=True)
                    for file in model.files
                )
                # A blob this job got (fetched, or found already there) is unreferenced until
                # the job records it; a pipeline evicted or deleted just then may have freed
                # it. Fetch what is missing again rather than call the pipeline warm.
                if all(f.blob and self.store.has(f.blob) for m in record.models
                       for f in m.files) and await self._checkpoint_intact(record):
                    break
            else:
                raise WeightCacheError("blobs were freed while the pipeline was filling")
            await self._build_shards(record, prepared.shard_reservation)
            if not self._is_current(record):
                return
            if record.staged:
                await self._promote(record)
                return
            record.state = "warm"
            record.error = None
            record.failures = 0
            self._save(record)
            emit("warm.finished", tenant=record.tenant, pipeline=record.id,
                 bytes_total=sum(f.size for m in record.models for f in m.files))
        except WeightCacheError as exc:
            self._fail(record, exc)
        except Exception as exc:  # a bug must not leave the pipeline "warming" forever
            log.exception("warm job of %s failed", record.key)
            self._fail(record, WeightCacheError(f"internal error: {type(exc).__name__}"))
        finally:
            self._finish(prepared)

    def _finish(self, prepared: _Prepared) -> None:
        """Release what a warm job held; once, whether its body ran or not."""
        prepared.finished = True
        self._release_unused(prepared)
        for origin in prepared.origins:
            self._close_when_idle(origin)
        self._progress.pop(prepared.record.job_key, None)
        self._update_gauges()

    async def _fill_file(
        self,
        record: PipelineRecord,
        model: ModelEntry,
        origin: Origin,
        file: FileEntry,
        prepared: _Prepared,
        limiter: anyio.CapacityLimiter,
    ) -> None:
        if file.blob and self.store.has(file.blob):
            return
        progress = self._progress.setdefault(record.job_key, {})
        progress_key = f"{model.name}/{file.path}"

        def on_progress(nbytes: int) -> None:
            progress[progress_key] = progress.get(progress_key, 0) + nbytes

        origin_file = file.origin_file()
        key = transfer_key(origin, model.source, model.revision or "", origin_file)
        async with limiter:
            fetching = asyncio.ensure_future(
                self.fetcher.fetch(
                    origin,
                    origin_file,
                    source=model.source,
                    revision=model.revision or "",
                    reservation=prepared.reservations.pop(key, None),
                    on_progress=on_progress,
                )
            )
            try:
                blob = await asyncio.shield(fetching)
            except asyncio.CancelledError:
                # The transfer goes on without this job: whatever it lands, nobody holds.
                fetching.add_done_callback(self._abandoned_fetch_done)
                raise
        file.blob = blob.sha256
        progress.pop(progress_key, None)
        if self._is_current(record):
            self._save(record)

    def _abandoned_fetch_done(self, fetching: asyncio.Future[BlobRecord]) -> None:
        if not fetching.cancelled():
            fetching.exception()  # retrieved: the job that wanted it is gone
        self._collect_orphans()

    async def _build_shards(
        self, record: PipelineRecord, reservation: Reservation | None = None
    ) -> None:
        """Per-TP-size shard sets; TP 1 and unsplittable models read the original files.

        A set another pipeline already built from the same blobs is reused (no bytes, no
        eviction); builds of one set run one at a time, so concurrent registrations of a
        model write it once."""
        for tp_size in record.spec.tp_sizes:
            key = str(tp_size)
            existing = record.shards.get(key)
            if (
                existing is not None
                and existing.state == "ready"
                and shard_set_is_current(existing)
                and all(self.store.has(r.blob) for r in existing.ranks)
            ):
                continue
            if tp_size == 1:
                record.shards[key] = ShardSet(tp_size=1, state="ready", mode="full")
            else:
                record.shards[key] = ShardSet(tp_size=tp_size, state="pending")
                self._save_if_current(record)
                async with self._shard_build_lock(record, tp_size):
                    reused = find_reusable(self.registry, self.store, record, tp_size)
                    if reused is None:
                        reused = await anyio.to_thread.run_sync(
                            functools.partial(
                                write_shard_set,
                                self.store,
                                record,
                                tp_size,
                                verify_blob=self.manifests.verify_blob,
                                reservation=reservation,
                            )
                        )
                    record.shards[key] = reused
                    self._save_if_current(record)  # before the next builder looks for one
            self._save_if_current(record)

    def _save_if_current(self, record: PipelineRecord) -> None:
        """Save a warm job's progress unless the pipeline was deleted, evicted or registered
        again meanwhile (saving it then would bring back what the user removed)."""
        if self._is_current(record):
            self._save(record)

    # ------------------------------------------------------------------ restage and retries
    async def _promote(self, attempt: PipelineRecord) -> None:
        """A staged re-registration is warm: it takes its pipeline's place in one write; the
        old version's bytes are freed after, or once the leases live now end (restage)."""
        async with self._lock:
            main = self.registry.get(attempt.tenant, attempt.id)
            if main is None or main.pending is None or (
                main.pending.generation != attempt.generation
            ):
                return
            self._cancel_job(main.key)  # a re-fill of the old version (after a quarantine)
            record, free_now = restage.promote(
                main, attempt, leases=self.registry.lease_ids(main.tenant, main.id)
            )
            self._save(record, with_pending=True)
        self.metrics.swaps.inc()
        emit("warm.finished", tenant=record.tenant, pipeline=record.id, staged=True,
             generation=record.generation, retired_blobs=len(record.retired_blobs),
             bytes_total=sum(f.size for m in record.models for f in m.files))
        if free_now:
            await anyio.to_thread.run_sync(lambda: self._free_unreferenced(free_now))

    def _free_retired(self) -> None:
        """Free the retired blobs of swapped pipelines whose pre-swap leases have all ended
        (expired ones too: the retry scheduler runs this on each pass)."""
        for record in list(self.registry.all()):
            self._free_retired_of(record)

    def _free_retired_of(self, record: PipelineRecord) -> None:
        if not record.retired_blobs:
            return
        live = [lease for lease in record.retired_leases if self.registry.lease_alive(lease)]
        if live and live == record.retired_leases:
            return  # nothing changed
        freed = restage.expired_retirement(record, live=live)
        self.registry.put(record)
        self._blob_tenants = None
        if freed:
            self._free_unreferenced(freed)
            self._update_gauges()

    async def _retry(self, target: RetryTarget) -> None:
        """Start a due automatic re-warm, if the failure it was scheduled for still stands."""
        main = self.registry.get(target.tenant, target.pipeline)
        record = main.pending if main is not None and target.staged else main
        if (
            record is None
            or record.generation != target.generation
            or record.state != "failed"
            or record.error is None
            or record.error.retry_at is None
        ):
            return
        self.metrics.warm_retries.labels("started").inc()
        emit("warm.retrying", tenant=record.tenant, pipeline=record.id, staged=record.staged,
             attempt=record.failures + 1, code=record.error.code)
        with contextlib.suppress(WeightCacheError):  # a failure is recorded on the pipeline
            await self._start_warm(record)

    async def _checkpoint_intact(self, record: PipelineRecord) -> bool:
        """Nothing is warm that cannot be loaded: check headers and indexes from the blobs
        (``checkpoint_check``; raises ``InvalidCheckpoint``). False when a blob read for it
        failed its digest (it was quarantined) or is gone: the fill fetches it again.

        The blobs were hashed as they arrived, so the first pass reads headers as they are;
        only a failure is checked again with the chunk digests, to tell a bad checkpoint from
        bytes that went bad on disk (hashing a 64 MiB chunk per file on every warm and every
        start is what this saves).
        """
        try:
            await anyio.to_thread.run_sync(check_checkpoint, record.models, self.store.blob_path)
            return True
        except InvalidCheckpoint:
            pass
        try:
            await anyio.to_thread.run_sync(
                functools.partial(
                    check_checkpoint,
                    record.models,
                    self.store.blob_path,
                    verify=lambda sha, header_only: self.manifests.verify_blob(
                        sha, header_only=header_only
                    ),
                )
            )
        except (IntegrityError, NotFound):  # quarantined, or freed under the job: fetch again
            return False
        return True

    async def _recheck_checkpoint(self, record: PipelineRecord) -> None:
        """A warm pipeline from before checkpoints were checked: fail it if it cannot load
        (a bad blob is quarantined instead, and the pipeline re-warmed)."""
        try:
            await self._checkpoint_intact(record)
        except InvalidCheckpoint as exc:
            self._fail(record, exc)

    @contextlib.asynccontextmanager
    async def _shard_build_lock(
        self, record: PipelineRecord, tp_size: int
    ) -> AsyncIterator[None]:
        key = (
            tuple(tuple(sorted((f.path, f.blob or "") for f in m.files)) for m in record.models),
            tp_size,
        )
        lock, users = self._shard_locks.get(key, (asyncio.Lock(), 0))
        self._shard_locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._shard_locks[key]
            if users == 1:
                del self._shard_locks[key]
            else:
                self._shard_locks[key] = (lock, users - 1)

    def _blobs_present(self, record: PipelineRecord) -> bool:
        return all(
            f.blob is not None and self.store.has(f.blob) for m in record.models for f in m.files
        ) and all(
            shard_set_is_current(s) and all(self.store.has(r.blob) for r in s.ranks)
            for s in record.shards.values()
        )

    # ------------------------------------------------------------------ status
    def status_of(self, record: PipelineRecord) -> PipelineStatus:
        status = self._status_of(record)
        retries = self.settings.retry
        status.error = scheduled_error(status.error, state=record.state, settings=retries)
        attempt = record.pending
        if attempt is not None:
            shown = restage.attempt_status(attempt, progress=self._progress_of(attempt))
            shown.error = scheduled_error(shown.error, state=attempt.state, settings=retries)
            if attempt.state == "failed":
                status.last_attempt = shown
            else:
                status.pending = shown
        return status

    def _progress_of(self, record: PipelineRecord) -> float:
        if record.state == "warm":
            return 1.0
        total = sum(m.bytes_total for m in record.models)
        done = sum(
            f.size for m in record.models for f in m.files if f.blob and self.store.has(f.blob)
        ) + sum(self._progress.get(record.job_key, {}).values())
        return min(1.0, done / total) if total else 0.0

    def _status_of(self, record: PipelineRecord) -> PipelineStatus:
        progress = self._progress.get(record.key, {})
        bytes_total = sum(m.bytes_total for m in record.models)
        committed = sum(
            f.size
            for m in record.models
            for f in m.files
            if f.blob is not None and self.store.has(f.blob)
        )
        bytes_cached = min(bytes_total, committed + sum(progress.values()))
        shard_bytes = sum(s.bytes_total for s in record.shards.values())
        leases = self.registry.leases_of(record.tenant, record.id)
        # "hot" on the wire means used by a replica within the hot window; the policy also
        # shelters a just-registered pipeline, but it has not been used, so it is not hot.
        hot = record.last_used_at is not None and (
            time.time() - record.last_used_at < self.settings.eviction.hot_window_s
        )
        return PipelineStatus(
            id=record.id,
            tenant=record.tenant,
            state=record.state,
            bytes_total=bytes_total + shard_bytes,
            bytes_cached=bytes_cached + shard_bytes,
            progress=1.0 if record.state == "warm" else (
                bytes_cached / bytes_total if bytes_total else 0.0
            ),
            models=restage.model_statuses(record),
            tp_sizes=record.spec.tp_sizes,
            shards={
                str(tp): (record.shards[str(tp)].state if str(tp) in record.shards else "pending")
                for tp in record.spec.tp_sizes
            },
            pinned=record.spec.pinned,
            hot=hot,
            last_used_at=record.last_used_at,
            registered_at=record.registered_at,
            error=record.error,
            evicted_reason=record.evicted_reason if record.state == "evicted" else None,
            unverified_files=sum(1 for m in record.models for f in m.files if not f.verified),
            active_leases=leases,
        )

    def node_info(self) -> NodeInfo:
        usage = self.store.usage()
        return NodeInfo(
            node_id=self.settings.node_id,
            region=self.settings.region,
            capacity=usage.capacity,
            used=usage.committed,
            reserved=usage.reserved,
            free=usage.free,
            version=VERSION,
            high_watermark=self.settings.eviction.high_watermark,
            low_watermark=self.settings.eviction.low_watermark,
            temp=usage.temp,
            in_flight=usage.in_flight,
            quarantined=usage.quarantined,
            data_url=self.settings.data_url,
        )

    def readiness_problems(self) -> list[str]:
        """What keeps the node from being ready (``disk_full``); empty when it is."""
        return self.disk.problems()

    def refresh_gauges(self) -> None:
        """Bring the byte and pipeline gauges up to date (before a scrape)."""
        self._update_gauges()

    def _update_gauges(self) -> None:
        usage = self.store.usage()
        for state, value in (
            ("committed", usage.committed),
            ("reserved", usage.reserved),
            ("temp", usage.temp),
            ("quarantined", usage.quarantined),
        ):
            self.metrics.bytes_by_state.labels(state).set(value)
        self.metrics.capacity_bytes.set(usage.capacity)
        self.metrics.used_bytes.set(usage.committed)
        self.metrics.reserved_bytes.set(usage.reserved)
        self.metrics.in_flight_bytes.set(usage.in_flight)
        self.metrics.free_bytes.set(usage.free)
        counts = dict.fromkeys(("cold", "warming", "warm", "failed", "evicted"), 0)
        for record in self.registry.all():
            counts[record.state] += 1
        for state, count in counts.items():
            self.metrics.pipelines_by_state.labels(state).set(count)

    def _on_quarantine(self, sha256: str, reason: str) -> None:
        self.metrics.digest_mismatches.labels("read").inc()
        emit("blob.quarantined", level=logging.ERROR, blob=sha256, reason=reason)
        self._blob_tenants = None
        self.manifests.forget(sha256)
        # A warm pipeline must have every blob: the ones that lost this one are cold until
        # it is fetched again, which starts now (start() does it for a node not yet running).
        for record in list(self.registry.all()):
            if record.state == "warm" and sha256 in record.own_blobs():
                record.state = "cold"
                self._save(record)
                self._rewarm_soon(record.key)

    def _rewarm_soon(self, key: str) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return

        def spawn() -> None:
            task = loop.create_task(self._rewarm(key), name=f"rewarm {key}")
            self._rewarming.add(task)
            task.add_done_callback(self._rewarming.discard)

        loop.call_soon_threadsafe(spawn)  # quarantine may happen in a worker thread

    async def _rewarm(self, key: str) -> None:
        tenant, _, pipeline_id = key.partition("/")
        record = self.registry.get(tenant, pipeline_id)
        if record is not None and record.state == "cold":
            with contextlib.suppress(WeightCacheError):  # a failure is recorded on the pipeline
                await self._start_warm(record)

    # ------------------------------------------------------------------ replica side
    def manifest(self, tenant: str, pipeline_id: str, *, tp_size: int, rank: int) -> Manifest:
        """What rank ``rank`` of a TP-``tp_size`` replica reads; counts as a use."""
        record = self._find(tenant, pipeline_id)
        if record.state != "warm":
            raise _not_warm(record)
        manifest = self.manifests.build(record, tp_size=tp_size, rank=rank)
        record.last_used_at = time.time()
        record.loads += 1
        self._save(record)
        return manifest

    def files(self, tenant: str, pipeline_id: str) -> list[PipelineFile]:
        """Every origin file of a warm pipeline with its blob (to materialise it on disk)."""
        record = self._find(tenant, pipeline_id)
        if record.state != "warm":
            raise _not_warm(record)
        return self.manifests.files(record)

    def create_lease(self, tenant: str, pipeline_id: str) -> Lease:
        record = self._find(tenant, pipeline_id)
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
            self._free_retired_of(record)

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


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _not_warm(record: PipelineRecord) -> NotWarm:
    """409 not_warm; for a failed pipeline it carries the failure's code as ``reason``, so a
    replica's load can say why (``invalid_checkpoint``, ``no_weights``, ...)."""
    if record.state == "failed" and record.error is not None:
        return NotWarm(
            f"pipeline {record.id!r} is failed: {record.error.code}: {record.error.message}",
            state=record.state,
            reason=record.error.code,
        )
    return NotWarm(f"pipeline {record.id!r} is {record.state}", state=record.state)


def _validate_spec(spec: PipelineSpec) -> None:
    names = [m.name for m in spec.models]
    if len(set(names)) != len(names):
        raise InvalidInput("model names must be unique within a pipeline", field="models")
    if any(tp < 1 or tp > 64 or tp & (tp - 1) for tp in spec.tp_sizes):
        raise InvalidInput("tp_sizes must be powers of two from 1 to 64", field="tp_sizes")
    if len(set(spec.tp_sizes)) != len(spec.tp_sizes):
        raise InvalidInput("tp_sizes must be unique", field="tp_sizes")
