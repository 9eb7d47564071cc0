"""Engine artifacts replicas upload for a pipeline: engine shard sets and compile caches.

A replica whose engine had to slice full tensors (or post-process them) uploads what it ended
with, one rank at a time, so that later replicas stream exactly their rank's final tensors; its
launcher uploads the engine's compile cache. Each upload is a **capture**, keyed by a
:class:`~api.schema.CaptureKey` and stored as one blob under the pipeline:

- **verified like any blob**: the node computes the sha256 and the chunk digests itself and
  stores nothing unless they match the size and digest the sender declared
  (:mod:`cache_node.uploads`); every read is checked against the chunk digests (I2), and a
  capture whose blob fails is dropped (:meth:`Captures.forget_blob`), never served again;
- **tenant-scoped**: only the pipeline's tenant (or admin) sees, uploads or reads it; another
  tenant's capture is a 404, like a missing one (I7);
- **charged to the pipeline**: its bytes are reserved before the first byte arrives (507
  ``insufficient_storage`` when there is no room even after evicting by the policy, and nothing
  is written), count in the pipeline's size, and go when it is evicted or deleted;
- **only for the pipeline as it is**: a key must name the snapshot (weights) or the
  ``config.json`` (compile cache) of the model as registered now; a re-registration that
  changes a model drops that model's captures (``restage.promote``).

Records live in ``PipelineRecord.captures``; writes hold the registry's lock around their read
and write, so a capture is never lost to a concurrent save of the record (``PipelineBook``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Sequence

from api.schema import CaptureKey, capture_id
from cache_node.capture_files import weights_contents
from cache_node.collector import Collector
from cache_node.errors import (
    CaptureKeyMismatch,
    Conflict,
    NotFound,
    NotWarm,
    TooLarge,
    TooManyUploads,
    WeightCacheError,
)
from cache_node.events import emit
from cache_node.evictor import Evictor
from cache_node.metrics import NodeMetrics
from cache_node.pipelines import PipelineBook
from cache_node.registry import CaptureRecord, PipelineRecord, Registry
from cache_node.settings import CaptureSettings
from cache_node.snapshots import config_blob, model_snapshot
from cache_node.store import BlobRecord, BlobStore
from cache_node.uploads import BlobUpload

__all__ = ["Captures", "PendingCapture", "in_listing_order"]

log = logging.getLogger("weightcache.node")




class PendingCapture:
    """An upload under way: its key, the pipeline it is for, and the bytes so far."""

    def __init__(
        self, *, tenant: str, pipeline: str, key: CaptureKey, upload: BlobUpload,
        on_refused: Callable[[CaptureKey, WeightCacheError], None],
        on_done: Callable[[], None],
    ) -> None:
        self.tenant = tenant
        self.pipeline = pipeline
        self.key = key
        self.id = capture_id(key)
        self.upload = upload
        self.on_refused = on_refused
        self._refused = False
        self._on_done: Callable[[], None] | None = on_done

    def done(self) -> None:
        """The upload is over (stored or dropped): its tenant's slot is free (once)."""
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done()

    def write(self, data: bytes) -> None:
        try:
            self.upload.write(data)
        except WeightCacheError as exc:  # more bytes than declared, a full disk
            self.refuse(exc)
            raise

    def refuse(self, error: WeightCacheError) -> None:
        """Count and log why the node did not take this upload (once)."""
        if not self._refused:
            self._refused = True
            self.on_refused(self.key, error)

    def abort(self) -> None:
        try:
            self.upload.abort()
        finally:
            self.done()


class Captures:
    """The captures of a node's pipelines: list, read, take uploads, drop."""

    def __init__(
        self,
        *,
        book: PipelineBook,
        registry: Registry,
        store: BlobStore,
        collector: Collector,
        evictor: Evictor,
        settings: CaptureSettings,
        metrics: NodeMetrics,
        on_change: Callable[[], None],
    ) -> None:
        self.book = book
        self.registry = registry
        self.store = store
        self.collector = collector
        self.evictor = evictor
        self.settings = settings
        self.metrics = metrics
        self.on_change = on_change
        self._committing = 0  # uploads between their blob's publish and their record
        self._open: dict[str, int] = {}  # uploads open per tenant
        self._lock = threading.Lock()

    @property
    def committing(self) -> int:
        """Uploads whose blob is published but not yet recorded (orphan collection waits)."""
        return self._committing

    # ------------------------------------------------------------------ reading
    def list(self, tenant: str, pipeline_id: str) -> list[CaptureRecord]:
        """The pipeline's captures, by model, kind, TP size and rank."""
        return in_listing_order(self.book.find(tenant, pipeline_id).captures.values())

    def get(
        self, tenant: str, pipeline_id: str, capture_id_: str
    ) -> tuple[CaptureRecord, BlobRecord]:
        """One capture and its blob; NotFound when the pipeline (of this tenant) has none."""
        record = self.book.find(tenant, pipeline_id)
        capture = record.captures.get(capture_id_)
        blob = self.store.get(capture.blob) if capture is not None else None
        if capture is None or blob is None:
            raise NotFound(f"pipeline {pipeline_id!r} has no capture {capture_id_}")
        return capture, blob

    # ------------------------------------------------------------------ uploads
    def begin(
        self, tenant: str, pipeline_id: str, capture_id_: str, key: CaptureKey, *,
        size: int, sha256: str,
    ) -> PendingCapture:
        """Check an upload before its first byte and reserve its ``size`` bytes.

        NotFound (another tenant's pipeline), CaptureKeyMismatch (an id that is not the key's,
        or a key of another version of the model), NotWarm, TooLarge, or
        InsufficientStorage (no room even after evicting others by the policy).
        """
        try:
            return self._begin(tenant, pipeline_id, capture_id_, key, size=size, sha256=sha256)
        except WeightCacheError as exc:
            self.refused(key, exc)
            raise

    def _begin(
        self, tenant: str, pipeline_id: str, capture_id_: str, key: CaptureKey, *,
        size: int, sha256: str,
    ) -> PendingCapture:
        if not self.settings.enabled:
            raise Conflict("this node takes no captures (WEIGHTCACHE_CAPTURES_ENABLED=false)",
                           reason="captures_disabled")
        record = self.book.find(tenant, pipeline_id)
        if capture_id(key) != capture_id_:
            raise CaptureKeyMismatch(
                f"capture id {capture_id_} is not the id of its key ({capture_id(key)})"
            )
        if record.state != "warm":
            raise NotWarm(f"pipeline {pipeline_id!r} is {record.state}", state=record.state)
        self._check_key(record, key)
        limit = self._limit(record, key)
        if size > limit:
            raise TooLarge(
                f"a {key.kind} capture of {size} bytes is over this pipeline's limit of {limit}",
                limit=limit,
                size=size,
            )
        self._take_upload_slot(record.tenant)  # before any eviction is done for it
        try:
            if self.store.usage().free < size:
                # Evict by the policy, but never this pipeline (its capture would go with it);
                # and when that is not enough, a 507 now: the store's own make-room evicts by
                # the policy alone, and might pick this very pipeline.
                self.evictor.make_room(size, keep=frozenset(record.blobs()))
                if self.store.usage().free < size:
                    raise self.store.not_enough_space(size)
            reservation = self.store.reserve(size)
            try:
                upload = BlobUpload(self.store, size=size, sha256=sha256,
                                    reservation=reservation)
            except BaseException:
                reservation.release()
                raise
        except BaseException:
            self._free_upload_slot(record.tenant)
            raise
        return PendingCapture(tenant=record.tenant, pipeline=record.id, key=key, upload=upload,
                              on_refused=self.refused,
                              on_done=lambda: self._free_upload_slot(record.tenant))

    def _take_upload_slot(self, tenant: str) -> None:
        limit = self.settings.uploads_per_tenant
        with self._lock:
            if self._open.get(tenant, 0) >= limit:
                raise TooManyUploads(
                    f"{limit} uploads of this tenant are open already "
                    "(WEIGHTCACHE_CAPTURES_UPLOADS_PER_TENANT)",
                    retry_after_s=5.0, limit=limit,
                )
            self._open[tenant] = self._open.get(tenant, 0) + 1

    def _free_upload_slot(self, tenant: str) -> None:
        with self._lock:
            left = self._open.get(tenant, 0) - 1
            if left > 0:
                self._open[tenant] = left
            else:
                self._open.pop(tenant, None)

    def refused(self, key: CaptureKey, error: WeightCacheError) -> None:
        """Count and log an upload the node did not take (the client gets the error)."""
        self.metrics.capture_uploads.labels(key.kind, error.code).inc()
        emit("capture.refused", level=logging.WARNING, kind=key.kind, model=key.model,
             tp_size=key.tp_size, rank=key.rank, code=error.code, error=str(error))

    def commit(self, pending: PendingCapture) -> tuple[CaptureRecord, BlobRecord]:
        """Check the bytes (size, sha256, and for weights a safetensors file of its stage),
        publish them and record the capture; it replaces one of the same id."""
        with self._lock:
            self._committing += 1
        try:
            return self._commit(pending)
        finally:
            with self._lock:
                self._committing -= 1
            pending.done()

    def _commit(self, pending: PendingCapture) -> tuple[CaptureRecord, BlobRecord]:
        try:
            pending.upload.finish()
            weights = pending.key.kind == "weights"
            stage, tensors = weights_contents(pending.upload.path) if weights else (None, [])
            blob = pending.upload.publish()
        except BaseException as exc:
            pending.abort()
            if isinstance(exc, WeightCacheError):  # not the bytes declared, not a capture
                pending.refuse(exc)
            raise
        capture = CaptureRecord(
            id=pending.id,
            key=pending.key,
            blob=blob.sha256,
            size=blob.size,
            stage=stage,
            tensors=tensors,
        )
        replaced: CaptureRecord | None = None
        superseded: Sequence[CaptureRecord] = ()
        refused: WeightCacheError | None = None
        with self.registry.lock:
            record = self.registry.get(pending.tenant, pending.pipeline)
            try:
                if record is None:
                    raise NotFound(f"no pipeline {pending.pipeline!r}")
                if record.state != "warm":  # evicted while the bytes came
                    raise NotWarm(f"pipeline {record.id!r} is {record.state}", state=record.state)
                self._check_key(record, pending.key)  # re-registered while the bytes came
            except (NotFound, Conflict) as exc:
                refused = exc
            else:
                replaced = record.captures.get(capture.id)
                record.captures[capture.id] = capture
                superseded = self._past_slot(record, capture)
                for old in superseded:
                    del record.captures[old.id]
                self.registry.put(record)
        if refused is not None:
            self.collector.free_unreferenced({blob.sha256: blob.size})
            pending.refuse(refused)
            raise refused
        freed = {c.blob: c.size for c in superseded}
        if replaced is not None and replaced.blob != capture.blob:
            freed[replaced.blob] = replaced.size
        if freed:
            self.collector.free_unreferenced(freed)
        for old in superseded:
            self.metrics.captures_dropped.labels("superseded").inc()
            emit("capture.dropped", tenant=pending.tenant, pipeline=pending.pipeline,
                 capture=old.id, reason=f"superseded by {capture.id} (at most "
                 f"{self.settings.per_slot} per model, TP size and rank)")
        self.on_change()
        self.metrics.capture_uploads.labels(pending.key.kind, "stored").inc()
        emit("capture.stored", tenant=pending.tenant, pipeline=pending.pipeline,
             capture=capture.id, kind=pending.key.kind, model=pending.key.model,
             tp_size=pending.key.tp_size, rank=pending.key.rank, stage=stage, bytes=blob.size)
        return capture, blob

    def delete(self, tenant: str, pipeline_id: str, capture_id_: str) -> None:
        """Drop one capture (NotFound when there is none) and free its blob."""
        found = self.book.find(tenant, pipeline_id)
        with self.registry.lock:
            record = self.registry.get(found.tenant, found.id)
            capture = record.captures.pop(capture_id_, None) if record is not None else None
            if record is None or capture is None:
                raise NotFound(f"pipeline {pipeline_id!r} has no capture {capture_id_}")
            self.registry.put(record)
        self.collector.free_unreferenced({capture.blob: capture.size})
        self.on_change()

    # ------------------------------------------------------------------ housekeeping
    def forget_blob(self, sha256: str) -> int:
        """Drop every capture whose blob is ``sha256`` (it was quarantined: it failed its
        digests). The pipelines stay warm; their next replica loads the normal way."""
        return self._drop(
            self.registry.blob_pipelines(sha256), lambda c: c.blob == sha256,
            reason="failed_verification", says="its blob failed verification",
        )

    def prune_missing(self) -> int:
        """Drop the captures whose blob is not on disk (at start-up, after the reconcile)."""
        return self._drop(
            [(r.tenant, r.id) for r in self.registry.all()], lambda c: not self.store.has(c.blob),
            reason="missing_on_disk", says="its blob is not on disk",
        )

    def _drop(
        self, pipelines: Iterable[tuple[str, str]], doomed: Callable[[CaptureRecord], bool], *,
        reason: str, says: str,
    ) -> int:
        """Drop the captures of ``pipelines`` that are ``doomed``; each one counted and logged."""
        dropped = 0
        for tenant, pipeline_id in list(pipelines):
            with self.registry.lock:
                record = self.registry.get(tenant, pipeline_id)
                if record is None:
                    continue
                gone = [cid for cid, c in record.captures.items() if doomed(c)]
                for cid in gone:
                    del record.captures[cid]
                if gone:
                    self.registry.put(record)
            for cid in gone:
                dropped += 1
                self.metrics.captures_dropped.labels(reason).inc()
                emit("capture.dropped", level=logging.ERROR, tenant=tenant, pipeline=pipeline_id,
                     capture=cid, reason=says)
        return dropped

    # ------------------------------------------------------------------ rules
    def _past_slot(
        self, record: PipelineRecord, newest: CaptureRecord
    ) -> Sequence[CaptureRecord]:
        """The captures of ``newest``'s slot past ``per_slot``, oldest first out."""
        slot = _slot(newest.key)
        same = [c for c in record.captures.values() if _slot(c.key) == slot]
        same.sort(key=lambda c: (c.id == newest.id, c.created_at))  # the newest stays last
        return same[: max(0, len(same) - self.settings.per_slot)]

    def _check_key(self, record: PipelineRecord, key: CaptureKey) -> None:
        model = next((m for m in record.models if m.name == key.model), None)
        if model is None:
            raise CaptureKeyMismatch(f"pipeline {record.id!r} has no model {key.model!r}")
        if key.tp_size not in record.spec.tp_sizes:
            raise CaptureKeyMismatch(
                f"tp_size {key.tp_size} is not registered (have {record.spec.tp_sizes})"
            )
        if key.kind == "weights" and key.snapshot != model_snapshot(model):
            raise CaptureKeyMismatch(
                f"snapshot {key.snapshot} is not model {key.model!r} as registered now "
                f"({model_snapshot(model)})",
                expected=model_snapshot(model),
            )
        if key.kind == "compile_cache" and key.config != config_blob(model):
            raise CaptureKeyMismatch(
                f"config {key.config} is not the config.json of model {key.model!r} now",
                expected=config_blob(model),
            )

    def _limit(self, record: PipelineRecord, key: CaptureKey) -> int:
        if key.kind == "compile_cache":
            return int(self.settings.compile_cache_max)
        model = next(m for m in record.models if m.name == key.model)
        return int(model.bytes_total * self.settings.weights_factor) + self.settings.weights_slack


def in_listing_order(captures: Iterable[CaptureRecord]) -> list[CaptureRecord]:
    """Captures as the status and the capture list show them: by model, kind, TP size, rank."""
    return sorted(
        captures, key=lambda c: (c.key.model, c.key.kind, c.key.tp_size, c.key.rank or 0, c.id)
    )


def _slot(key: CaptureKey) -> tuple[object, ...]:
    """What a capture stands for apart from engine, version, device and settings: a model's
    rank at a TP size (weights), or a model at a TP size (compile caches)."""
    return (key.kind, key.model, key.tp_size, key.rank, key.pp_size, key.pp_rank)
