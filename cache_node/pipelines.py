"""A node's pipeline records as its jobs see them: found by tenant, saved without losing what
another writer set, and checked for being still current.

The registry stores records; this adds the rules about *which* record a write may touch: a
staged re-registration lives in its pipeline's ``pending`` slot, a job's copy of the retired
blobs is stale, and a job whose pipeline was evicted, deleted or registered again must not
write it back (I7: another tenant's pipeline is indistinguishable from a missing one).
"""

from __future__ import annotations

from cache_node.errors import AmbiguousPipeline, NotFound
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

    def save(self, record: PipelineRecord, *, with_pending: bool = False) -> None:
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
