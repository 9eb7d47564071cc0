"""The cache node service: pipelines from registration to warm, manifests, leases, blob access.

Routes call these methods and nothing else; every method takes the caller's tenant first, and a
pipeline of another tenant is indistinguishable from a missing one (I7).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

import anyio

import eviction
from api.schema import (
    ErrorInfo,
    Lease,
    Manifest,
    ModelSpec,
    ModelStatus,
    NodeInfo,
    PipelineFile,
    PipelineSpec,
    PipelineStatus,
)
from cache_node.errors import (
    Conflict,
    InsufficientStorage,
    InvalidInput,
    NotFound,
    NotWarm,
    WeightCacheError,
)
from cache_node.events import emit
from cache_node.evictor import Evictor, eviction_entry
from cache_node.fetch import Fetcher, transfer_key
from cache_node.load_history import LoadHistory
from cache_node.manifests import ManifestBuilder
from cache_node.metadata import DiskcacheKeyValue, KeyValue
from cache_node.metrics import NodeMetrics
from cache_node.origins import Origin, open_origin, validate_source
from cache_node.origins.base import OriginFile, Snapshot
from cache_node.registry import (
    FileEntry,
    ModelEntry,
    PipelineRecord,
    Registry,
    ShardSet,
)
from cache_node.settings import NodeSettings
from cache_node.shard_sets import is_current as shard_set_is_current
from cache_node.shard_sets import write_shard_set
from cache_node.store import BlobRecord, BlobStore, Reservation
from cache_node.tasks import run_all
from cache_node.tenants import ADMIN_TENANT, DEFAULT_TENANT

log = logging.getLogger("weightcache.node")

VERSION = "0.1.0"
_FILES_AT_ONCE = 4
_FILL_ROUNDS = 3


@dataclass
class _Prepared:
    """What the pre-warm resolved and reserved before any origin byte moved."""

    record: PipelineRecord
    origins: list[Origin]
    reservations: dict[str, Reservation]  # transfer key → space held for it


class CacheNode:
    """One cache node: store, fetcher, registry and the warm jobs that tie them together."""

    def __init__(self, settings: NodeSettings, *, meta: KeyValue | None = None) -> None:
        self.settings = settings
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        self.tokens = settings.load_tokens()
        self.metrics = NodeMetrics()
        self.meta = meta or DiskcacheKeyValue(settings.data_dir / "meta")
        self.store = BlobStore(
            settings.data_dir,
            capacity=settings.capacity,
            meta=self.meta,
            on_quarantine=self._on_quarantine,
        )
        self.registry = Registry(self.meta)
        self.fetcher = Fetcher(self.store, settings.fetch, metrics=self.metrics)
        self.load_history = LoadHistory(self.meta, self.metrics)
        self._jobs: dict[str, asyncio.Task[None]] = {}
        self._progress: dict[str, dict[str, int]] = {}  # pipeline key → path → bytes in flight
        self._blob_tenants: dict[str, set[str]] | None = None
        self.manifests = ManifestBuilder(self.store)
        self._lock = asyncio.Lock()
        self._closing: set[asyncio.Task[None]] = set()
        self._resolving: dict[tuple[object, ...], asyncio.Task[Snapshot]] = {}
        self._watermark_task: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None  # set by start(); for other threads
        self._rewarming: set[asyncio.Task[None]] = set()
        self.evictor = Evictor(
            self.registry, self.store, settings.eviction, evict=self._evict_record
        )
        self.store.make_room = self.make_room

    @property
    def auth_enabled(self) -> bool:
        return self.tokens is not None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Reconcile disk with metadata, then resume the pipelines that were warming."""
        report = await anyio.to_thread.run_sync(lambda: self.store.check(fix=True))
        self._loop = asyncio.get_running_loop()
        self._collect_orphans()  # before any job: left by transfers of pipelines now gone
        if report.missing or report.quarantined or report.orphans_removed:
            log.warning("start-up reconcile: %s", report)
        for record in list(self.registry.all()):
            if record.state == "warm" and not self._blobs_present(record):
                record.state = "cold"
                self._save(record)
            if record.state in ("warming", "cold") and record.error is None:
                with contextlib.suppress(WeightCacheError):
                    await self._start_warm(record)
        self._update_gauges()
        self._watermark_task = asyncio.create_task(self._watermark_loop(), name="watermarks")

    async def stop(self) -> None:
        if self._watermark_task is not None:
            self._watermark_task.cancel()
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
        if record is None:
            raise NotFound(f"no pipeline {pipeline_id!r}", pipeline=pipeline_id)
        return record

    def _save(self, record: PipelineRecord) -> None:
        self.registry.put(record)
        self._blob_tenants = None

    async def register(
        self, tenant: str, pipeline_id: str, spec: PipelineSpec
    ) -> tuple[PipelineStatus, bool]:
        """Upsert a pipeline and start its pre-warm. Returns (status, changed)."""
        _validate_spec(spec)
        for model in spec.models:  # a bad source is a 400 before anything is recorded
            validate_source(model, self.settings, auth_enabled=self.auth_enabled)
        async with self._lock:
            existing = self.registry.get(tenant, pipeline_id)
            if (
                existing is not None
                and existing.spec == spec
                and existing.state in ("warm", "warming")
            ):
                return self.status_of(existing), False
            record = PipelineRecord(id=pipeline_id, tenant=tenant, spec=spec)
            if existing is not None:
                record.registered_at = existing.registered_at
                record.last_used_at = existing.last_used_at
                record.generation = existing.generation + 1
                if existing.spec.models == spec.models:
                    record.models = existing.models
            self._save(record)
        emit("pipeline.registered", tenant=tenant, pipeline=pipeline_id,
             generation=record.generation, models=len(spec.models), tp_sizes=spec.tp_sizes)
        await self._start_warm(record)
        return self.status(tenant, pipeline_id), True

    async def warm(self, tenant: str, pipeline_id: str) -> PipelineStatus:
        """Re-warm after eviction or failure; a no-op for a warm or warming pipeline."""
        record = self._find(tenant, pipeline_id)
        if record.state not in ("warm", "warming"):
            await self._start_warm(record)
        return self.status(record.tenant, pipeline_id)

    def status(self, tenant: str, pipeline_id: str) -> PipelineStatus:
        return self.status_of(self._find(tenant, pipeline_id))

    def pipelines(self, tenant: str) -> list[PipelineStatus]:
        records = self.registry.all()
        return sorted(
            (self.status_of(r) for r in records if tenant in (r.tenant, ADMIN_TENANT)),
            key=lambda s: (s.tenant, s.id),
        )

    async def delete(self, tenant: str, pipeline_id: str) -> None:
        """Forget a pipeline and free the bytes no other pipeline references."""
        record = self._find(tenant, pipeline_id)
        self._cancel_job(record.key)
        self.registry.delete(record.tenant, record.id)
        self.load_history.forget(record.tenant, record.id)
        self._blob_tenants = None
        await anyio.to_thread.run_sync(lambda: self._free_unreferenced(record.blobs()))
        self._update_gauges()
        emit("pipeline.deleted", tenant=record.tenant, pipeline=record.id)

    async def evict(self, tenant: str, pipeline_id: str, *, reason: str = "manual") -> int:
        """Free a pipeline's bytes (those not shared with pipelines that stay). Returns bytes."""
        record = self._find(tenant, pipeline_id)
        if self.registry.active_leases().get(record.key):
            raise Conflict(f"pipeline {pipeline_id!r} is leased by a loading replica")
        return await anyio.to_thread.run_sync(lambda: self._evict_record(record, reason))

    def _evict_record(self, record: PipelineRecord, reason: str) -> int:
        self._cancel_job(record.key)
        blobs = record.blobs()
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
        self._save(record)  # metadata first: nothing points at a blob we are about to unlink
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
                await anyio.to_thread.run_sync(self.enforce_watermarks)
            except Exception:  # the loop must outlive one bad pass
                log.exception("watermark pass failed")

    def _free_unreferenced(self, blobs: dict[str, int]) -> int:
        still_used: set[str] = set()
        for other in self.registry.all():
            still_used.update(other.blobs())
        return sum(self.store.delete(sha) for sha in blobs if sha not in still_used)

    # ------------------------------------------------------------------ warm jobs
    async def _start_warm(self, record: PipelineRecord) -> None:
        """Resolve and reserve now (so a 507 reaches the caller), then fill in the background."""
        self._cancel_job(record.key)
        record.state = "warming"
        record.error = None
        record.evicted_reason = None
        self._save(record)
        emit("warm.started", tenant=record.tenant, pipeline=record.id,
             generation=record.generation)
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
        task = asyncio.create_task(self._fill(prepared), name=f"warm {record.key}")
        self._jobs[record.key] = task
        task.add_done_callback(lambda _: self._job_done(record.key, task))

    def _is_current(self, record: PipelineRecord) -> bool:
        """Whether ``record`` is still the registry's generation of its pipeline."""
        current = self.registry.get(record.tenant, record.id)
        return current is not None and current.generation == record.generation

    def _release_unused(self, prepared: _Prepared) -> None:
        """Give back the space of files the job never started to fetch."""
        for key, reservation in prepared.reservations.items():
            reservation.release()
            if not self.fetcher.in_flight(key):
                self.store.release_partial(key)  # its partial, if any, counts as temp again
        prepared.reservations.clear()

    def _job_done(self, key: str, task: asyncio.Task[None]) -> None:
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
        current = self.registry.get(record.tenant, record.id)
        if current is None or current.generation != record.generation:
            return
        record = current
        record.state = "failed"
        retry_at = exc.details.get("retry_at")
        record.error = ErrorInfo(
            code=exc.code,
            message=exc.message,
            retry_at=float(retry_at) if retry_at is not None else None,
        )
        self._save(record)
        emit("warm.failed", level=logging.WARNING, tenant=record.tenant, pipeline=record.id,
             code=exc.code, message=exc.message, retry_at=record.error.retry_at)
        self._progress.pop(record.key, None)
        self._collect_orphans()  # a failed re-registration leaves the old version's blobs
        self._update_gauges()

    async def _prepare(self, record: PipelineRecord) -> _Prepared:
        origins = [
            open_origin(m, self.settings, auth_enabled=self.auth_enabled)
            for m in record.spec.models
        ]
        try:
            models = []
            for model, origin in zip(record.spec.models, origins, strict=True):
                snapshot = await self._resolve(model, origin)
                previous = {
                    (f.path, f.size, f.sha256, f.etag): f.blob
                    for m in record.models
                    if m.name == model.name
                    for f in m.files
                }
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
            reservations = await anyio.to_thread.run_sync(lambda: self._reserve(record, origins))
        except BaseException:
            for origin in origins:
                await origin.aclose()
            raise
        return _Prepared(record, origins, reservations)

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
        return snapshot

    def _reserve(self, record: PipelineRecord, origins: list[Origin]) -> dict[str, Reservation]:
        """Hold the space of every file still to fetch, all before the first origin byte (I5)."""
        needed: dict[str, int] = {}
        for model, origin in zip(record.models, origins, strict=True):
            for file in model.files:
                if file.blob and self.store.has(file.blob):
                    continue
                if file.sha256 and self.store.has(file.sha256):
                    continue
                key = transfer_key(origin, model.source, model.revision or "", _origin_file(file))
                known = self.store.meta.get(f"transfer:{key}")
                if known is not None and self.store.has(known["sha256"]):
                    continue  # fetched before under this key and still here: a hit, no bytes
                if not self.fetcher.in_flight(key):
                    needed[key] = file.size
        total = sum(needed.values()) + self._shard_bytes_estimate(record)
        if total > self.store.capacity:
            raise InsufficientStorage(
                f"pipeline needs {total} bytes but the node's capacity is {self.store.capacity}",
                needed=total,
                capacity=self.store.capacity,
            )
        self._make_room_for(needed)
        reservations: dict[str, Reservation] = {}
        try:
            for key, size in needed.items():
                reservations[key] = self.store.reserve(size, partial_key=key)
        except InsufficientStorage:
            for reservation in reservations.values():
                reservation.release()
            for key in reservations:
                self.store.release_partial(key)
            raise
        return reservations

    def _make_room_for(self, needed: dict[str, int]) -> None:
        """Evict for all of ``needed`` at once, or fail having evicted nothing.

        Reserving file by file would make room for the first files and then fail on a later
        one, throwing warm pipelines away for nothing. A file's own idle partial (a transfer
        to resume) is counted as temp now and stops counting once its reservation is made.
        """
        own_partials = 0
        for key in needed:
            with contextlib.suppress(FileNotFoundError):
                own_partials += self.store.partial_path(key).stat().st_size
        extra = sum(needed.values()) - own_partials
        if extra <= self.store.usage().free:
            return
        self.make_room(extra)
        free = self.store.usage().free
        if extra > free:
            raise InsufficientStorage(
                f"not enough space: the pipeline needs {extra} bytes, {free} free of "
                f"{self.store.capacity} after eviction",
                needed=extra,
                free=free,
                capacity=self.store.capacity,
            )

    def _shard_bytes_estimate(self, record: PipelineRecord) -> int:
        weights = sum(
            f.size for m in record.models for f in m.files if f.path.endswith(".safetensors")
        )
        return weights * sum(1 for tp in record.spec.tp_sizes if tp > 1)

    async def _fill(self, prepared: _Prepared) -> None:
        record = prepared.record
        self._progress.setdefault(record.key, {})
        limiter = anyio.CapacityLimiter(_FILES_AT_ONCE)
        try:
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
                       for f in m.files):
                    break
            else:
                raise WeightCacheError("blobs were freed while the pipeline was filling")
            await self._build_shards(record)
            current = self.registry.get(record.tenant, record.id)
            if current is None or current.generation != record.generation:
                return
            record.state = "warm"
            record.error = None
            self._save(record)
            emit("warm.finished", tenant=record.tenant, pipeline=record.id,
                 bytes_total=sum(f.size for m in record.models for f in m.files))
        except WeightCacheError as exc:
            self._fail(record, exc)
        except Exception as exc:  # a bug must not leave the pipeline "warming" forever
            log.exception("warm job of %s failed", record.key)
            self._fail(record, WeightCacheError(f"internal error: {type(exc).__name__}"))
        finally:
            self._release_unused(prepared)
            for origin in prepared.origins:
                self._close_when_idle(origin)
            self._progress.pop(record.key, None)
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
        progress = self._progress.setdefault(record.key, {})
        progress_key = f"{model.name}/{file.path}"

        def on_progress(nbytes: int) -> None:
            progress[progress_key] = progress.get(progress_key, 0) + nbytes

        origin_file = _origin_file(file)
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
        current = self.registry.get(record.tenant, record.id)
        if current is not None and current.generation == record.generation:
            self._save(record)

    def _abandoned_fetch_done(self, fetching: asyncio.Future[BlobRecord]) -> None:
        if not fetching.cancelled():
            fetching.exception()  # retrieved: the job that wanted it is gone
        self._collect_orphans()

    async def _build_shards(self, record: PipelineRecord) -> None:
        """Per-TP-size shard sets; TP 1 and unsplittable models read the original files."""
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
                self._save(record)
                record.shards[key] = await anyio.to_thread.run_sync(
                    functools.partial(
                        write_shard_set,
                        self.store,
                        record,
                        tp_size,
                        verify_blob=self.manifests.verify_blob,
                    )
                )
            self._save(record)

    def _blobs_present(self, record: PipelineRecord) -> bool:
        return all(
            f.blob is not None and self.store.has(f.blob) for m in record.models for f in m.files
        ) and all(
            shard_set_is_current(s) and all(self.store.has(r.blob) for r in s.ranks)
            for s in record.shards.values()
        )

    # ------------------------------------------------------------------ status
    def status_of(self, record: PipelineRecord) -> PipelineStatus:
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
        leases = self.registry.active_leases().get(record.key, 0)
        hot = eviction.is_hot(
            eviction_entry(record, leased=bool(leases)),
            now=time.time(),
            hot_window_s=self.settings.eviction.hot_window_s,
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
            models=[
                ModelStatus(
                    name=m.name,
                    source=m.source,
                    revision=m.revision,
                    files=len(m.files),
                    bytes_total=m.bytes_total,
                )
                for m in record.models
            ]
            or [
                ModelStatus(name=m.name, source=m.source, revision=m.revision, files=0,
                            bytes_total=0)
                for m in record.spec.models
            ],
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
            quarantined=usage.quarantined,
            data_url=self.settings.data_url,
        )

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
            if record.state == "warm" and sha256 in record.blobs():
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
            raise NotWarm(f"pipeline {pipeline_id!r} is {record.state}", state=record.state)
        manifest = self.manifests.build(record, tp_size=tp_size, rank=rank)
        record.last_used_at = time.time()
        record.loads += 1
        self._save(record)
        return manifest

    def files(self, tenant: str, pipeline_id: str) -> list[PipelineFile]:
        """Every origin file of a warm pipeline with its blob (to materialise it on disk)."""
        record = self._find(tenant, pipeline_id)
        if record.state != "warm":
            raise NotWarm(f"pipeline {pipeline_id!r} is {record.state}", state=record.state)
        return self.manifests.files(record)

    def create_lease(self, tenant: str, pipeline_id: str) -> Lease:
        record = self._find(tenant, pipeline_id)
        lease = self.registry.create_lease(
            record.tenant, record.id, ttl_s=self.settings.lease_ttl_s
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

    def authorize_blob(self, tenant: str, sha256: str) -> BlobRecord:
        """The blob's record if a pipeline of ``tenant`` references it; NotFound otherwise (I7)."""
        if self._blob_tenants is None:
            index: dict[str, set[str]] = {}
            for record in self.registry.all():
                for sha in record.blobs():
                    index.setdefault(sha, set()).add(record.tenant)
            self._blob_tenants = index
        tenants = self._blob_tenants.get(sha256, set())
        blob = self.store.get(sha256)
        if blob is None or not (tenant in tenants or (tenant == ADMIN_TENANT and tenants)):
            raise NotFound(f"no blob {sha256}")
        return blob

    def iter_blob(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Verified bytes ``[start, end)`` of a blob (I2)."""
        for data in self.store.iter_verified(sha256, start, end):
            self.metrics.bytes_served.inc(len(data))
            yield data


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def _validate_spec(spec: PipelineSpec) -> None:
    names = [m.name for m in spec.models]
    if len(set(names)) != len(names):
        raise InvalidInput("model names must be unique within a pipeline", field="models")
    if any(tp < 1 or tp > 64 or tp & (tp - 1) for tp in spec.tp_sizes):
        raise InvalidInput("tp_sizes must be powers of two from 1 to 64", field="tp_sizes")
    if len(set(spec.tp_sizes)) != len(spec.tp_sizes):
        raise InvalidInput("tp_sizes must be unique", field="tp_sizes")


def _origin_file(file: FileEntry) -> OriginFile:
    return OriginFile(
        path=file.path,
        size=file.size,
        sha256=file.sha256,
        git_sha1=file.git_sha1,
        md5=file.md5,
        etag=file.etag,
    )
