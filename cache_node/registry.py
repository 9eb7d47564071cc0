"""Pipelines and leases: what a node has been asked to keep warm, and who is loading it.

Records live in the node's :class:`~cache_node.metadata.KeyValue` (diskcache on one node,
Redis in a multi-node region) under ``pipeline:<tenant>/<id>`` and ``lease:<lease_id>``.
A pipeline id is unique within its tenant, so one tenant can neither see nor guess another's
pipelines (I7).

Indexes kept beside them, so that no request costs a scan of every tenant's records:

- ``blob-refs:<sha256>``: the pipelines ``[tenant, id]`` referencing a blob, updated by every
  :meth:`Registry.put` and :meth:`Registry.delete` from the blobs the record gained or lost.
  Both ports authorise a blob with one read of it (:meth:`Registry.blob_tenants`).
- ``lease-index:<tenant>/<id>`` and ``tenant-leases:<tenant>``: lease id → expiry, so a
  pipeline's status counts its own leases and the per-tenant lease limit counts the tenant's.

The indexes are written by the node's API process only (the data plane reads), under one lock;
:meth:`Registry.ensure_indexes` builds them once for a data dir written before they existed.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.schema import (
    CaptureKey,
    CaptureStage,
    CaptureTensor,
    ErrorInfo,
    ManifestTensor,
    PipelineSpec,
    PipelineState,
    ShardState,
)
from cache_node.errors import TooManyLeases
from cache_node.metadata import KeyValue
from cache_node.origins.base import OriginFile


class FileEntry(OriginFile):
    """One origin file of a model, and the blob holding it once fetched."""

    model_config = ConfigDict(frozen=False)

    blob: str | None = None  # the committed blob's sha256
    verified: bool = False

    def origin_file(self) -> OriginFile:
        """The file as the origin protocol names it (what the fetcher reads and checks)."""
        return OriginFile(**{name: getattr(self, name) for name in OriginFile.model_fields})


class ModelEntry(BaseModel):
    """One model of a pipeline, resolved to an immutable snapshot (I9)."""

    name: str
    source: str
    revision: str | None = None
    files: list[FileEntry] = Field(default_factory=list)

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)


class RankShard(BaseModel):
    """One rank's shard blob of one model and the tensors inside it."""

    model: str
    rank: int
    blob: str
    size: int
    tensors: list[ManifestTensor]


class ShardSet(BaseModel):
    """All rank shards of one TP size. ``mode="full"``: ranks read the unsplit original files."""

    tp_size: int
    state: ShardState = "pending"
    mode: Literal["full", "sharded"] = "sharded"
    ranks: list[RankShard] = Field(default_factory=list)
    note: str | None = None
    #: The rule the ranks were cut by (``sharding.SHARD_LAYOUT``); None: written before layouts
    #: were recorded. A sharded set of another layout is rebuilt, never served.
    layout: str | None = None
    #: Vocab-parallel rows: each model's V, and the multiple V was padded to before splitting.
    vocab_sizes: dict[str, int] = Field(default_factory=dict)
    vocab_padding: int | None = None

    @property
    def bytes_total(self) -> int:
        return sum(r.size for r in self.ranks)


class CaptureRecord(BaseModel):
    """An engine artifact a replica uploaded for this pipeline (``cache_node.captures``): one
    rank's engine shard set, or an engine compile cache, stored as one blob."""

    id: str  # api.schema.capture_id(key)
    key: CaptureKey
    blob: str
    size: int
    stage: CaptureStage | None = None  # weights only
    tensors: list[CaptureTensor] = Field(default_factory=list)  # weights only
    created_at: float = Field(default_factory=time.time)


class PipelineRecord(BaseModel):
    """Everything a node knows about one pipeline."""

    id: str
    tenant: str
    spec: PipelineSpec
    state: PipelineState = "cold"
    models: list[ModelEntry] = Field(default_factory=list)
    shards: dict[str, ShardSet] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    registered_at: float = Field(default_factory=time.time)
    last_used_at: float | None = None
    evicted_reason: str | None = None
    loads: int = 0  # manifests served: the policy's frequency signal
    generation: int = 0  # bumped on every (re-)registration, so stale warm jobs stop
    failures: int = 0  # failed warms in a row of this spec: the retry backoff's exponent
    # A re-registration of a warm pipeline fills here (``staged`` set on it) while this
    # version keeps serving; it takes this one's place once warm (``cache_node.restage``).
    staged: bool = False
    pending: PipelineRecord | None = None
    # Blobs of the version a swap replaced, kept while the leases taken before it live:
    # a replica may be reading the old manifest's bytes.
    retired_blobs: dict[str, int] = Field(default_factory=dict)
    retired_leases: list[str] = Field(default_factory=list)
    # Engine shard sets and compile caches replicas uploaded, by capture id. Charged to the
    # pipeline, evicted and deleted with it, and dropped when their model changes.
    captures: dict[str, CaptureRecord] = Field(default_factory=dict)

    @property
    def key(self) -> str:
        return pipeline_key(self.tenant, self.id)

    @property
    def job_key(self) -> str:
        """The key of this version's warm job (a staged re-registration has its own)."""
        return staged_job_key(self.key) if self.staged else self.key

    def weight_blobs(self) -> dict[str, int]:
        """The blobs a replica needs of this version (files and shards), with sizes: a node
        holds the pipeline whole when it holds these. Captures are extras of one node."""
        referenced = {f.blob: f.size for m in self.models for f in m.files if f.blob}
        for shard_set in self.shards.values():
            referenced.update({r.blob: r.size for r in shard_set.ranks})
        return referenced

    def own_blobs(self) -> dict[str, int]:
        """The blobs of this version (files, shards and captures), with sizes."""
        referenced = self.weight_blobs()
        referenced.update({c.blob: c.size for c in self.captures.values()})
        return referenced

    def blobs(self) -> dict[str, int]:
        """Every blob this pipeline references: its own, a pending re-registration's and the
        retired ones still leased (what must not be freed while it exists), with sizes."""
        referenced = self.own_blobs()
        if self.pending is not None:
            referenced.update(self.pending.own_blobs())
        referenced.update(self.retired_blobs)
        return referenced


class LeaseRecord(BaseModel):
    lease_id: str
    tenant: str
    pipeline: str
    expires_at: float


def pipeline_key(tenant: str, pipeline_id: str) -> str:
    return f"{tenant}/{pipeline_id}"


def staged_job_key(key: str) -> str:
    """The warm-job key of a pipeline's staged re-registration (``#`` is never in an id)."""
    return f"{key}#pending"


_INDEX_VERSION_KEY = "index:registry"
_INDEX_VERSION = 1


class Registry:
    """Pipelines and leases on a :class:`KeyValue`, with the indexes described above."""

    def __init__(self, meta: KeyValue) -> None:
        self.meta = meta
        self._lock = threading.RLock()  # one writer of the indexes at a time (thread-safe)

    @property
    def lock(self) -> threading.RLock:
        """Held by :meth:`put` and :meth:`delete`; a read-modify-write of a record that must not
        lose another writer's change holds it around its read and its write."""
        return self._lock

    # pipelines
    def get(self, tenant: str, pipeline_id: str) -> PipelineRecord | None:
        raw = self.meta.get(f"pipeline:{pipeline_key(tenant, pipeline_id)}")
        return None if raw is None else PipelineRecord.model_validate(raw)

    def put(self, record: PipelineRecord) -> None:
        key = f"pipeline:{record.key}"
        with self._lock:
            old = self.meta.get(key)
            self.meta.set(key, record.model_dump(mode="json"))
            before = set(PipelineRecord.model_validate(old).blobs()) if old else set()
            self._update_blob_refs((record.tenant, record.id),
                                   added=set(record.blobs()) - before,
                                   removed=before - set(record.blobs()))

    def delete(self, tenant: str, pipeline_id: str) -> None:
        key = pipeline_key(tenant, pipeline_id)
        with self._lock:
            old = self.meta.get(f"pipeline:{key}")
            self.meta.delete(f"pipeline:{key}")
            if old is not None:
                removed = set(PipelineRecord.model_validate(old).blobs())
                self._update_blob_refs((tenant, pipeline_id), added=set(), removed=removed)

    def all(self) -> Iterator[PipelineRecord]:
        for _, raw in self.meta.scan("pipeline:"):
            yield PipelineRecord.model_validate(raw)

    def of_tenant(self, tenant: str) -> Iterator[PipelineRecord]:
        """The pipelines of one tenant (a prefix scan: the cost of its own records only)."""
        for _, raw in self.meta.scan(f"pipeline:{tenant}/"):
            record = PipelineRecord.model_validate(raw)
            if record.tenant == tenant:  # not tenant "a/b" when asked for "a"
                yield record

    def by_id(self, pipeline_id: str) -> list[PipelineRecord]:
        """Every tenant's pipeline of this id (for the admin tenant)."""
        return [r for r in self.all() if r.id == pipeline_id]

    # the blob → pipelines index
    def blob_tenants(self, sha256: str) -> set[str]:
        """The tenants with a pipeline that references blob ``sha256`` (one metadata read)."""
        return {tenant for tenant, _ in self._blob_refs(sha256)}

    def blob_pipelines(self, sha256: str) -> set[tuple[str, str]]:
        """The pipelines ``(tenant, id)`` that reference blob ``sha256`` (one metadata read)."""
        return self._blob_refs(sha256)

    def _blob_refs(self, sha256: str) -> set[tuple[str, str]]:
        # (tenant, id) pairs, never "tenant/id" strings: a tenant's name may hold a slash.
        raw = self.meta.get(f"blob-refs:{sha256}")
        return {(tenant, pipeline) for tenant, pipeline in raw["pipelines"]} if raw else set()

    def _update_blob_refs(
        self, ref: tuple[str, str], *, added: set[str], removed: set[str]
    ) -> None:
        for sha256 in added | removed:
            pipelines = self._blob_refs(sha256)
            if sha256 in added:
                pipelines.add(ref)
            else:
                pipelines.discard(ref)
            if pipelines:
                self.meta.set(f"blob-refs:{sha256}", {"pipelines": sorted(pipelines)})
            else:
                self.meta.delete(f"blob-refs:{sha256}")

    def ensure_indexes(self) -> bool:
        """Build the indexes from the records if this data dir has none yet. Returns whether
        it did (once per data dir: afterwards every write keeps them up to date)."""
        with self._lock:
            marker = self.meta.get(_INDEX_VERSION_KEY)
            if marker is not None and marker.get("version") == _INDEX_VERSION:
                return False
            for prefix in ("blob-refs:", "lease-index:", "tenant-leases:"):
                for key, _ in list(self.meta.scan(prefix)):
                    self.meta.delete(key)
            refs: dict[str, set[tuple[str, str]]] = {}
            for record in self.all():
                for sha256 in record.blobs():
                    refs.setdefault(sha256, set()).add((record.tenant, record.id))
            for sha256, pipelines in refs.items():
                self.meta.set(f"blob-refs:{sha256}", {"pipelines": sorted(pipelines)})
            now = time.time()
            for _, raw in list(self.meta.scan("lease:")):
                lease = LeaseRecord.model_validate(raw)
                if lease.expires_at > now:
                    self._index_lease(lease)
            self.meta.set(_INDEX_VERSION_KEY, {"version": _INDEX_VERSION})
            return True

    # leases
    def create_lease(
        self, tenant: str, pipeline_id: str, *, ttl_s: float, limit: int | None = None
    ) -> LeaseRecord:
        """A new lease; TooManyLeases (429) when ``tenant`` already holds ``limit`` of them."""
        now = time.time()
        lease = LeaseRecord(
            lease_id=uuid.uuid4().hex,
            tenant=tenant,
            pipeline=pipeline_id,
            expires_at=now + ttl_s,
        )
        with self._lock:
            held = self._live(f"tenant-leases:{tenant}", now)
            if limit is not None and len(held) >= limit:
                raise TooManyLeases(
                    f"tenant {tenant!r} holds {len(held)} leases, the limit is {limit}",
                    retry_after_s=max(1.0, min(held.values()) - now),
                    limit=limit,
                )
            self.meta.set(f"lease:{lease.lease_id}", lease.model_dump(mode="json"))
            self._index_lease(lease, now=now)
        return lease

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        if not lease_id.isalnum() or len(lease_id) > 64:
            return None
        raw = self.meta.get(f"lease:{lease_id}")
        return None if raw is None else LeaseRecord.model_validate(raw)

    def renew_lease(self, lease: LeaseRecord, *, ttl_s: float) -> LeaseRecord:
        renewed = lease.model_copy(update={"expires_at": time.time() + ttl_s})
        with self._lock:
            self.meta.set(f"lease:{lease.lease_id}", renewed.model_dump(mode="json"))
            self._index_lease(renewed)
        return renewed

    def delete_lease(self, lease_id: str) -> None:
        with self._lock:
            lease = self.get_lease(lease_id)
            self.meta.delete(f"lease:{lease_id}")
            if lease is not None:
                for key in _lease_index_keys(lease):
                    held = self._live(key, time.time())
                    held.pop(lease_id, None)
                    self._store_index(key, held)

    def leases_of(self, tenant: str, pipeline_id: str, *, now: float | None = None) -> int:
        """Unexpired leases on one pipeline (one metadata read, whatever else is leased)."""
        now = time.time() if now is None else now
        return len(self._live(f"lease-index:{pipeline_key(tenant, pipeline_id)}", now))

    def _live(self, key: str, now: float) -> dict[str, float]:
        raw: dict[str, Any] | None = self.meta.get(key)
        leases: dict[str, float] = raw["leases"] if raw else {}
        return {lease_id: at for lease_id, at in leases.items() if at > now}

    def _index_lease(self, lease: LeaseRecord, *, now: float | None = None) -> None:
        now = time.time() if now is None else now
        for key in _lease_index_keys(lease):
            held = self._live(key, now)  # expired entries are dropped on every write
            held[lease.lease_id] = lease.expires_at
            self._store_index(key, held)

    def _store_index(self, key: str, held: dict[str, float]) -> None:
        if held:
            self.meta.set(key, {"leases": held})
        else:
            self.meta.delete(key)

    def active_leases(self, *, now: float | None = None) -> dict[str, int]:
        """Unexpired lease counts by pipeline key; expired leases are removed on the way.

        A scan of every lease, for eviction (which must know every leased pipeline); a status
        uses :meth:`leases_of` instead.
        """
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        for key, raw in self.meta.scan("lease:"):
            lease = LeaseRecord.model_validate(raw)
            if lease.expires_at <= now:
                self.meta.delete(key)  # its index entries are ignored and dropped by expiry
                continue
            pkey = pipeline_key(lease.tenant, lease.pipeline)
            counts[pkey] = counts.get(pkey, 0) + 1
        return counts

    def lease_ids(self, tenant: str, pipeline_id: str, *, now: float | None = None) -> list[str]:
        """The unexpired leases on one pipeline (from the lease index: one metadata read)."""
        now = time.time() if now is None else now
        return sorted(self._live(f"lease-index:{pipeline_key(tenant, pipeline_id)}", now))

    def lease_alive(self, lease_id: str, *, now: float | None = None) -> bool:
        """Whether this lease exists and has not expired."""
        lease = self.get_lease(lease_id)
        return lease is not None and lease.expires_at > (time.time() if now is None else now)

def _lease_index_keys(lease: LeaseRecord) -> tuple[str, str]:
    return (
        f"lease-index:{pipeline_key(lease.tenant, lease.pipeline)}",
        f"tenant-leases:{lease.tenant}",
    )
