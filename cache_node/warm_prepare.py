"""Before a warm job moves a byte: resolve each source, check it has weights, and reserve
the space of every file still to fetch and of the TP shard sets (I5), so that a 507 reaches
the registering caller instead of failing a job half-way."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
from dataclasses import dataclass

import anyio

from api.schema import ModelSpec
from cache_node.access import TenantAccess
from cache_node.checkpoint_check import check_file_list
from cache_node.errors import InsufficientStorage, OriginError
from cache_node.events import emit
from cache_node.evictor import Evictor
from cache_node.fetch import Fetcher, transfer_key
from cache_node.origins import Origin, open_origin
from cache_node.origins.base import Snapshot
from cache_node.origins.patterns import without_excluded
from cache_node.pipelines import PipelineBook
from cache_node.registry import FileEntry, ModelEntry, PipelineRecord, Registry
from cache_node.shard_headers import ReadAheadSkipped, exact_shard_bytes_ahead
from cache_node.shard_space import ShardNeed, shard_bytes_to_reserve
from cache_node.store import BlobStore, Reservation
from loader.errors import HeaderError


@dataclass
class Prepared:
    """What the pre-warm resolved and reserved before any origin byte moved."""

    record: PipelineRecord
    origins: list[Origin]
    reservations: dict[str, Reservation]  # transfer key → space held for it
    shard_reservation: Reservation | None = None  # the TP shard sets' space (I5)
    finished: bool = False  # its job released all of the above
    shard_need: ShardNeed = dataclasses.field(default_factory=ShardNeed)
    held: dict[tuple[str, str], str] | None = None  # files found on disk (model, path) → blob


class WarmPreparer:
    """Resolves and reserves for warm jobs; one registration reserves at a time."""

    def __init__(
        self,
        *,
        access: TenantAccess,
        book: PipelineBook,
        registry: Registry,
        store: BlobStore,
        fetcher: Fetcher,
        evictor: Evictor,
    ) -> None:
        self.access = access
        self.book = book
        self.registry = registry
        self.store = store
        self.fetcher = fetcher
        self.evictor = evictor
        # Two registrations of one model must not both reserve its files: the second sees
        # the first's reservations (I5).
        self._reserve_lock = threading.Lock()
        self._resolving: dict[tuple[object, ...], asyncio.Task[Snapshot]] = {}

    async def prepare(self, record: PipelineRecord) -> Prepared:
        for model in record.spec.models:  # the tokens file may have changed since
            self.access.check_source(record.tenant, model, pipeline=record.id)
        settings = self.access.settings_for(record.tenant)  # the tenant's own credentials
        auth_enabled = self.access.tokens is not None
        origins = [open_origin(m, settings, auth_enabled=auth_enabled) for m in record.spec.models]
        prepared: Prepared | None = None
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
            if self.book.is_current(record):  # an eviction or deletion meanwhile wins
                self.book.save(record)
            prepared = Prepared(record, origins, {})
            await anyio.to_thread.run_sync(lambda: self._reserve(prepared))
        except BaseException:
            if prepared is not None:  # a cancelled request: what the thread reserved goes back
                self.release_unused(prepared)
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

    def _reserve(self, prepared: Prepared) -> None:
        """Hold the space of every file still to fetch and of the TP shard sets still to
        write, all before the first origin byte (I5). Only physical need counts: a file on
        disk, in flight or reserved by another job, and a shard set already written, cost
        nothing."""
        with self._reserve_lock:
            self._reserve_locked(prepared)

    def _reserve_locked(self, prepared: Prepared) -> None:
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

    async def true_up_shards(self, prepared: Prepared) -> None:
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

    def release_unused(self, prepared: Prepared) -> None:
        """Give back the space of files the job never started to fetch."""
        for key, reservation in prepared.reservations.items():
            reservation.release()
            if not self.fetcher.in_flight(key):
                self.store.release_partial(key)  # its partial, if any, counts as temp again
        prepared.reservations.clear()
        if prepared.shard_reservation is not None:
            prepared.shard_reservation.release()

