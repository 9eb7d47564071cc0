"""Warm jobs: fill a pipeline's files from its origins, check the checkpoint, build its TP
shard sets, and mark it warm, or failed with a retry time; a staged re-registration takes
its pipeline's place when warm (restage). Each job is a task of the node's ``TaskOwner``."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Callable

import anyio

from cache_node import restage
from cache_node.checkpoint_check import check_checkpoint
from cache_node.collector import Collector
from cache_node.errors import (
    InsufficientStorage,
    IntegrityError,
    InvalidCheckpoint,
    InvalidInput,
    NotFound,
    WeightCacheError,
)
from cache_node.events import emit
from cache_node.fetch import Fetcher, transfer_key
from cache_node.manifests import ManifestBuilder
from cache_node.metrics import NodeMetrics
from cache_node.origins import Origin
from cache_node.pipelines import PipelineBook
from cache_node.registry import FileEntry, ModelEntry, PipelineRecord, Registry, ShardSet
from cache_node.retry import RetryScheduler, RetryTarget, failure_info
from cache_node.settings import RetrySettings
from cache_node.shard_sets import is_current as shard_set_is_current
from cache_node.shard_sets import write_shard_set
from cache_node.shard_space import find_reusable
from cache_node.store import BlobRecord, BlobStore, Reservation
from cache_node.tasks import TaskOwner, run_all
from cache_node.warm_prepare import Prepared, WarmPreparer

log = logging.getLogger("weightcache.node")

_FILES_AT_ONCE = 4
_FILL_ROUNDS = 3


class WarmJobs:
    """Starts, runs, fails and retries the warm jobs of one node."""

    def __init__(
        self,
        *,
        book: PipelineBook,
        registry: Registry,
        store: BlobStore,
        fetcher: Fetcher,
        manifests: ManifestBuilder,
        preparer: WarmPreparer,
        collector: Collector,
        tasks: TaskOwner,
        metrics: NodeMetrics,
        retry_settings: RetrySettings,
        registration_lock: asyncio.Lock,
        on_change: Callable[[], None],
    ) -> None:
        self.book = book
        self.registry = registry
        self.store = store
        self.fetcher = fetcher
        self.manifests = manifests
        self.preparer = preparer
        self.collector = collector
        self.tasks = tasks
        self.metrics = metrics
        self.retry_settings = retry_settings
        self.registration_lock = registration_lock
        self.on_change = on_change  # the byte and pipeline gauges follow each change
        self.retries = RetryScheduler(
            retry_settings,
            records=registry.all,
            retry=self.retry,
            clock=time.time,
            each_pass=collector.free_retired,
        )
        self._progress: dict[str, dict[str, int]] = {}  # job key → file → bytes in flight
        self._shard_locks: dict[tuple[object, ...], tuple[asyncio.Lock, int]] = {}

    def busy(self) -> bool:
        """Whether any warm job, or shard build, is running."""
        return self.tasks.has_jobs() or bool(self._shard_locks)

    def bytes_in_flight(self, job_key: str) -> int:
        """Bytes of the job's transfers so far that are not yet blobs."""
        return sum(self._progress.get(job_key, {}).values())

    async def start(self, record: PipelineRecord) -> None:
        """Resolve and reserve now (so a 507 reaches the caller), then fill in the background."""
        self.cancel(record.job_key)
        record.state = "warming"
        record.error = None
        record.evicted_reason = None
        self.book.save(record)
        emit("warm.started", tenant=record.tenant, pipeline=record.id,
             generation=record.generation, staged=record.staged, attempt=record.failures + 1)
        try:
            prepared = await self.preparer.prepare(record)
        except WeightCacheError as exc:
            self.fail(record, exc)
            if isinstance(exc, InsufficientStorage | InvalidInput):
                raise
            return
        if not self.book.is_current(record):  # evicted, deleted or registered again meanwhile
            self.preparer.release_unused(prepared)
            for origin in prepared.origins:
                self._close_when_idle(origin)
            return
        self.tasks.start_job(
            record.job_key, self._fill(prepared), on_done=lambda: self._job_done(prepared)
        )

    def _job_done(self, prepared: Prepared) -> None:
        if not prepared.finished:
            # cancelled before its first step (an eviction or deletion right after the
            # registration): its body never ran, so its space and origins are let go here
            self._finish(prepared)
        self.collector.collect_orphans()

    def _close_when_idle(self, origin: Origin) -> None:
        """Close an origin once no transfer reads from it: a pipeline that stops (failed,
        evicted, deleted) may have started a transfer other pipelines are still waiting on."""

        async def close() -> None:
            pending = self.fetcher.tasks_using(origin)
            if pending:
                await asyncio.wait(pending)
            await origin.aclose()

        self.tasks.spawn(close(), name="close origin", finish=True)

    def cancel(self, key: str) -> None:
        """Stop the job of ``key`` (from any thread: evictions run in worker threads)."""
        self.tasks.cancel_job(key)
        self._progress.pop(key, None)  # an evicted or deleted pipeline has nothing in flight

    def fail(self, record: PipelineRecord, exc: WeightCacheError) -> None:
        if isinstance(exc, InsufficientStorage):
            self.metrics.insufficient_storage.inc()
        current = self.book.stored(record)
        if current is None:
            return
        record = current
        record.state = "failed"
        record.failures += 1
        record.error = failure_info(
            exc, failures=record.failures, settings=self.retry_settings, now=time.time()
        )
        self.book.save(record)
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
        self.collector.collect_orphans()  # a failed re-registration leaves the old version's blobs
        self.on_change()

    async def _fill(self, prepared: Prepared) -> None:
        record = prepared.record
        self._progress.setdefault(record.job_key, {})
        limiter = anyio.CapacityLimiter(_FILES_AT_ONCE)
        try:
            await self.preparer.true_up_shards(prepared)
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
            if not self.book.is_current(record):
                return
            if record.staged:
                await self._promote(record)
                return
            record.state = "warm"
            record.error = None
            record.failures = 0
            self.book.save(record)
            emit("warm.finished", tenant=record.tenant, pipeline=record.id,
                 bytes_total=sum(f.size for m in record.models for f in m.files))
        except WeightCacheError as exc:
            self.fail(record, exc)
        except Exception as exc:  # a bug must not leave the pipeline "warming" forever
            log.exception("warm job of %s failed", record.key)
            self.fail(record, WeightCacheError(f"internal error: {type(exc).__name__}"))
        finally:
            self._finish(prepared)

    def _finish(self, prepared: Prepared) -> None:
        """Release what a warm job held; once, whether its body ran or not."""
        prepared.finished = True
        self.preparer.release_unused(prepared)
        for origin in prepared.origins:
            self._close_when_idle(origin)
        self._progress.pop(prepared.record.job_key, None)
        self.on_change()

    async def _fill_file(
        self,
        record: PipelineRecord,
        model: ModelEntry,
        origin: Origin,
        file: FileEntry,
        prepared: Prepared,
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
        if self.book.is_current(record):
            self.book.save(record)

    def _abandoned_fetch_done(self, fetching: asyncio.Future[BlobRecord]) -> None:
        if not fetching.cancelled():
            fetching.exception()  # retrieved: the job that wanted it is gone
        self.collector.collect_orphans()

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
                self.book.save_if_current(record)
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
                    self.book.save_if_current(record)  # before the next builder looks for one
            self.book.save_if_current(record)

    # ------------------------------------------------------------------ restage and retries
    async def _promote(self, attempt: PipelineRecord) -> None:
        """A staged re-registration is warm: it takes its pipeline's place in one write; the
        old version's bytes are freed after, or once the leases live now end (restage)."""
        async with self.registration_lock:
            main = self.registry.get(attempt.tenant, attempt.id)
            if main is None or main.pending is None or (
                main.pending.generation != attempt.generation
            ):
                return
            self.cancel(main.key)  # a re-fill of the old version (after a quarantine)
            with self.registry.lock:  # no capture recorded between this read and the write
                main = self.registry.get(attempt.tenant, attempt.id) or main
                record, free_now = restage.promote(
                    main, attempt, leases=self.registry.lease_ids(main.tenant, main.id)
                )
                self.book.save(record, with_pending=True)
        self.metrics.swaps.inc()
        emit("warm.finished", tenant=record.tenant, pipeline=record.id, staged=True,
             generation=record.generation, retired_blobs=len(record.retired_blobs),
             bytes_total=sum(f.size for m in record.models for f in m.files))
        if free_now:
            await anyio.to_thread.run_sync(lambda: self.collector.free_unreferenced(free_now))

    async def retry(self, target: RetryTarget) -> None:
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
            await self.start(record)

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

    async def recheck_checkpoint(self, record: PipelineRecord) -> None:
        """A warm pipeline from before checkpoints were checked: fail it if it cannot load
        (a bad blob is quarantined instead, and the pipeline re-warmed)."""
        try:
            await self._checkpoint_intact(record)
        except InvalidCheckpoint as exc:
            self.fail(record, exc)

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

    def on_quarantine(self, sha256: str, reason: str) -> None:
        self.metrics.digest_mismatches.labels("read").inc()
        emit("blob.quarantined", level=logging.ERROR, blob=sha256, reason=reason)
        self.manifests.forget(sha256)
        # A warm pipeline must have every blob: the ones that lost this one are cold until
        # it is fetched again, which starts now (start() does it for a node not yet running).
        for record in list(self.registry.all()):
            if record.state == "warm" and sha256 in record.own_blobs():
                record.state = "cold"
                self.book.save(record)
                self._rewarm_soon(record.key)

    def _rewarm_soon(self, key: str) -> None:
        # a quarantine may happen in a worker thread
        self.tasks.spawn_soon(lambda: self._rewarm(key), name=f"rewarm {key}")

    async def _rewarm(self, key: str) -> None:
        tenant, _, pipeline_id = key.partition("/")
        record = self.registry.get(tenant, pipeline_id)
        if record is not None and record.state == "cold":
            with contextlib.suppress(WeightCacheError):  # a failure is recorded on the pipeline
                await self.start(record)

