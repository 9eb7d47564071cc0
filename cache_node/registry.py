"""Pipelines and leases: what a node has been asked to keep warm, and who is loading it.

Records live in the node's :class:`~cache_node.metadata.KeyValue` (diskcache on one node,
Redis in a multi-node region) under ``pipeline:<tenant>/<id>`` and ``lease:<lease_id>``.
A pipeline id is unique within its tenant, so one tenant can neither see nor guess another's
pipelines (I7).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Literal

from pydantic import BaseModel, Field

from api.schema import ErrorInfo, ManifestTensor, PipelineSpec, PipelineState, ShardState
from cache_node.metadata import KeyValue


class FileEntry(BaseModel):
    """One origin file of a model, and the blob holding it once fetched."""

    path: str
    size: int
    sha256: str | None = None  # declared by the origin
    git_sha1: str | None = None
    md5: str | None = None
    etag: str | None = None
    blob: str | None = None  # the committed blob's sha256
    verified: bool = False


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

    @property
    def key(self) -> str:
        return pipeline_key(self.tenant, self.id)

    def blobs(self) -> dict[str, int]:
        """Every blob this pipeline references (files and shards), with sizes."""
        referenced = {f.blob: f.size for m in self.models for f in m.files if f.blob}
        for shard_set in self.shards.values():
            referenced.update({r.blob: r.size for r in shard_set.ranks})
        return referenced


class LeaseRecord(BaseModel):
    lease_id: str
    tenant: str
    pipeline: str
    expires_at: float


def pipeline_key(tenant: str, pipeline_id: str) -> str:
    return f"{tenant}/{pipeline_id}"


class Registry:
    """Pipelines and leases on a :class:`KeyValue`."""

    def __init__(self, meta: KeyValue) -> None:
        self.meta = meta

    # pipelines
    def get(self, tenant: str, pipeline_id: str) -> PipelineRecord | None:
        raw = self.meta.get(f"pipeline:{pipeline_key(tenant, pipeline_id)}")
        return None if raw is None else PipelineRecord.model_validate(raw)

    def put(self, record: PipelineRecord) -> None:
        self.meta.set(f"pipeline:{record.key}", record.model_dump(mode="json"))

    def delete(self, tenant: str, pipeline_id: str) -> None:
        self.meta.delete(f"pipeline:{pipeline_key(tenant, pipeline_id)}")

    def all(self) -> Iterator[PipelineRecord]:
        for _, raw in self.meta.scan("pipeline:"):
            yield PipelineRecord.model_validate(raw)

    def by_id(self, pipeline_id: str) -> list[PipelineRecord]:
        """Every tenant's pipeline of this id (for the admin tenant)."""
        return [r for r in self.all() if r.id == pipeline_id]

    # leases
    def create_lease(self, tenant: str, pipeline_id: str, *, ttl_s: float) -> LeaseRecord:
        lease = LeaseRecord(
            lease_id=uuid.uuid4().hex,
            tenant=tenant,
            pipeline=pipeline_id,
            expires_at=time.time() + ttl_s,
        )
        self.meta.set(f"lease:{lease.lease_id}", lease.model_dump(mode="json"))
        return lease

    def get_lease(self, lease_id: str) -> LeaseRecord | None:
        if not lease_id.isalnum() or len(lease_id) > 64:
            return None
        raw = self.meta.get(f"lease:{lease_id}")
        return None if raw is None else LeaseRecord.model_validate(raw)

    def renew_lease(self, lease: LeaseRecord, *, ttl_s: float) -> LeaseRecord:
        renewed = lease.model_copy(update={"expires_at": time.time() + ttl_s})
        self.meta.set(f"lease:{lease.lease_id}", renewed.model_dump(mode="json"))
        return renewed

    def delete_lease(self, lease_id: str) -> None:
        self.meta.delete(f"lease:{lease_id}")

    def active_leases(self, *, now: float | None = None) -> dict[str, int]:
        """Unexpired lease counts by pipeline key; expired leases are removed on the way."""
        now = time.time() if now is None else now
        counts: dict[str, int] = {}
        for key, raw in self.meta.scan("lease:"):
            lease = LeaseRecord.model_validate(raw)
            if lease.expires_at <= now:
                self.meta.delete(key)
                continue
            pkey = pipeline_key(lease.tenant, lease.pipeline)
            counts[pkey] = counts.get(pkey, 0) + 1
        return counts
