"""A node's pipeline records as its jobs see them: found by tenant, saved without losing what
another writer set, and checked for being still current.

The registry stores records; this adds the rules about *which* record a write may touch: a
staged re-registration lives in its pipeline's ``pending`` slot, a job's copy of the retired
blobs is stale, and a job whose pipeline was evicted, deleted or registered again must not
write it back (I7: another tenant's pipeline is indistinguishable from a missing one).
"""

from __future__ import annotations

from api.schema import PipelineSpec
from cache_node import restage
from cache_node.errors import AmbiguousPipeline, InvalidInput, NotFound, NotWarm
from cache_node.registry import PipelineRecord, Registry
from cache_node.tenants import ADMIN_TENANT


class PipelineBook:
    """Reads and writes of pipeline records with the rules above."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry

    def find(self, tenant: str, pipeline_id: str) -> PipelineRecord:
        """``tenant``'s pipeline; the admin's view names any tenant's, if only one has it."""
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

    def find_warm(self, tenant: str, pipeline_id: str) -> PipelineRecord:
        """``find``, and 409 ``not_warm`` unless the pipeline is warm."""
        record = self.find(tenant, pipeline_id)
        if record.state != "warm":
            raise not_warm(record)
        return record

    def save(self, record: PipelineRecord, *, with_pending: bool = False) -> None:
        """Write ``record``; a staged one into its pipeline's ``pending`` slot (if it is still
        the one there). A pipeline's own save keeps the stored ``pending``, retired blobs,
        captures and pin (a job's copy of them is stale) unless ``with_pending`` says it sets
        them itself."""
        with self.registry.lock:  # nothing written between this read and the write is lost
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
                # captures are written by uploads (cache_node.captures) while jobs and
                # manifests hold copies of the record: the stored ones are the current ones
                record.captures = stored.captures
            self.registry.put(record)

    def mark_evicted(self, record: PipelineRecord, reason: str) -> dict[str, int]:
        """Write ``record`` as evicted (its blobs unset, its captures gone, the newest spec kept
        to warm next); returns the blobs it held, for the caller to free."""
        with self.registry.lock:  # a capture uploaded since the caller read the record counts
            stored = self.registry.get(record.tenant, record.id)
            if stored is not None:
                record.captures = stored.captures
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
            record.captures = {}  # engine artifacts go with the bytes they were made from
            # metadata first: nothing points at a blob the caller is about to unlink
            self.save(record, with_pending=True)
        return blobs

    def stored(self, record: PipelineRecord) -> PipelineRecord | None:
        """The registry's copy of ``record`` (its pipeline, or the staged re-registration
        beside it) if it is still that generation; None once evicted, deleted or replaced."""
        stored = self.registry.get(record.tenant, record.id)
        if stored is not None and record.staged:
            stored = stored.pending
        return stored if stored is not None and stored.generation == record.generation else None

    def is_current(self, record: PipelineRecord) -> bool:
        """Whether ``record`` is still the registry's generation of its pipeline."""
        return self.stored(record) is not None

    def save_if_current(self, record: PipelineRecord) -> None:
        """Save a job's progress unless the pipeline was deleted, evicted or registered again
        meanwhile (saving it then would bring back what the user removed)."""
        if self.is_current(record):
            self.save(record)


def not_warm(record: PipelineRecord) -> NotWarm:
    """409 not_warm; for a failed pipeline it carries the failure's code as ``reason``, so a
    replica's load can say why (``invalid_checkpoint``, ``no_weights``, ...)."""
    if record.state == "failed" and record.error is not None:
        return NotWarm(
            f"pipeline {record.id!r} is failed: {record.error.code}: {record.error.message}",
            state=record.state,
            reason=record.error.code,
        )
    return NotWarm(f"pipeline {record.id!r} is {record.state}", state=record.state)


def validate_spec(spec: PipelineSpec) -> None:
    """What the wire model cannot say alone: unique model names, TP sizes powers of two."""
    names = [m.name for m in spec.models]
    if len(set(names)) != len(names):
        raise InvalidInput("model names must be unique within a pipeline", field="models")
    if any(tp < 1 or tp > 64 or tp & (tp - 1) for tp in spec.tp_sizes):
        raise InvalidInput("tp_sizes must be powers of two from 1 to 64", field="tp_sizes")
    if len(set(spec.tp_sizes)) != len(spec.tp_sizes):
        raise InvalidInput("tp_sizes must be unique", field="tp_sizes")
