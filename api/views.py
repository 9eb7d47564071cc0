"""The wire views of a node's records: ``PipelineStatus`` and ``NodeInfo``, built here so
that what the domain stores and what the API shows can change apart."""

from __future__ import annotations

import time

from api.schema import (
    AttemptStatus,
    CaptureInfo,
    CaptureSummary,
    ManifestBlob,
    ModelStatus,
    NodeInfo,
    PipelineStatus,
)
from cache_node.captures import in_listing_order
from cache_node.node import VERSION, CacheNode
from cache_node.registry import CaptureRecord, PipelineRecord
from cache_node.retry import scheduled_error
from cache_node.store import BlobRecord


def pipeline_status(node: CacheNode, record: PipelineRecord) -> PipelineStatus:
    """A pipeline as ``GET /v1/pipelines/{id}`` shows it, with its staged attempt, if any."""
    status = _status_of(node, record)
    retries = node.settings.retry
    status.error = scheduled_error(status.error, state=record.state, settings=retries)
    attempt = record.pending
    if attempt is not None:
        shown = _attempt_status(attempt, progress=_progress_of(node, attempt))
        shown.error = scheduled_error(shown.error, state=attempt.state, settings=retries)
        if attempt.state == "failed":
            status.last_attempt = shown
        else:
            status.pending = shown
    return status


def node_info(node: CacheNode) -> NodeInfo:
    usage = node.store.usage()
    settings = node.settings
    return NodeInfo(
        node_id=settings.node_id,
        region=settings.region,
        capacity=usage.capacity,
        used=usage.committed,
        reserved=usage.reserved,
        free=usage.free,
        version=VERSION,
        high_watermark=settings.eviction.high_watermark,
        low_watermark=settings.eviction.low_watermark,
        temp=usage.temp,
        in_flight=usage.in_flight,
        quarantined=usage.quarantined,
        data_url=settings.data_url,
    )


def _committed_bytes(node: CacheNode, record: PipelineRecord) -> int:
    """Bytes of the record's files that are blobs on disk now."""
    return sum(
        f.size
        for m in record.models
        for f in m.files
        if f.blob is not None and node.store.has(f.blob)
    )


def _progress_of(node: CacheNode, record: PipelineRecord) -> float:
    if record.state == "warm":
        return 1.0
    total = sum(m.bytes_total for m in record.models)
    done = _committed_bytes(node, record) + node.warming.bytes_in_flight(record.job_key)
    return min(1.0, done / total) if total else 0.0


def _status_of(node: CacheNode, record: PipelineRecord) -> PipelineStatus:
    bytes_total = sum(m.bytes_total for m in record.models)
    in_flight = node.warming.bytes_in_flight(record.key)
    bytes_cached = min(bytes_total, _committed_bytes(node, record) + in_flight)
    shard_bytes = sum(s.bytes_total for s in record.shards.values())
    # engine artifacts are the pipeline's bytes too: charged to it, evicted with it
    shard_bytes += sum(c.size for c in record.captures.values())
    leases = node.registry.leases_of(record.tenant, record.id)
    # "hot" on the wire means used by a replica within the hot window; the policy also
    # shelters a just-registered pipeline, but it has not been used, so it is not hot.
    hot = record.last_used_at is not None and (
        time.time() - record.last_used_at < node.settings.eviction.hot_window_s
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
        models=_model_statuses(record),
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
        captures=[capture_summary(c) for c in in_listing_order(record.captures.values())],
    )


def capture_summary(capture: CaptureRecord) -> CaptureSummary:
    """A capture as the status and the capture list show it."""
    return CaptureSummary(
        id=capture.id,
        key=capture.key,
        stage=capture.stage,
        bytes=capture.size,
        created_at=capture.created_at,
    )


def capture_info(capture: CaptureRecord, blob: BlobRecord) -> CaptureInfo:
    """A capture with its blob's digests and its tensors, for a replica to read it."""
    return CaptureInfo(
        **capture_summary(capture).model_dump(),
        blob=ManifestBlob(
            sha256=blob.sha256,
            size=blob.size,
            chunk_size=blob.chunk_size,
            chunk_xxh3_128=list(blob.chunk_xxh3_128),
        ),
        tensors=capture.tensors,
    )


def _model_statuses(record: PipelineRecord) -> list[ModelStatus]:
    """The models of a pipeline (or of a staged attempt) as the status shows them: resolved
    ones with their files and bytes, else the spec's, not yet resolved."""
    return [
        ModelStatus(
            name=m.name,
            source=m.source,
            revision=m.revision,
            files=len(m.files),
            bytes_total=m.bytes_total,
        )
        for m in record.models
    ] or [
        ModelStatus(name=m.name, source=m.source, revision=m.revision, files=0, bytes_total=0)
        for m in record.spec.models
    ]


def _attempt_status(attempt: PipelineRecord, *, progress: float) -> AttemptStatus:
    """A staged record as the status shows it."""
    return AttemptStatus(
        models=_model_statuses(attempt),
        tp_sizes=attempt.spec.tp_sizes,
        pinned=attempt.spec.pinned,
        state=attempt.state,
        progress=progress,
        registered_at=attempt.registered_at,
        error=attempt.error,
    )
