"""Re-registering never takes a warm copy offline: the new spec fills beside the warm one.

When a warm pipeline is registered again with another spec, the new spec becomes a *staged*
record (``PipelineRecord.pending``, ``staged`` set) with a warm job of its own, while the warm
version keeps serving manifests, leases and bytes; its ``state`` stays ``warm``. Then:

- the staged record becomes warm → :func:`promote` swaps it in, in one metadata write. The old
  version's blobs no other version holds are freed after the swap, or, while leases taken before
  the swap live (a replica may be reading the old manifest's bytes), kept as ``retired_blobs``
  until those leases end (:func:`expired_retirement`);
- it fails → it stays beside the warm version as ``last_attempt`` in the status (a transient
  failure is retried, see ``cache_node.retry``); the warm version is untouched;
- registered again (a third spec) → the staged one is replaced; registered back to the warm
  spec → the staged one is dropped;
- the pipeline is deleted → both go, with every byte no other pipeline holds;
- the pipeline is evicted → both go; the record keeps the newest spec (:func:`fold_pending`),
  so the next warm warms what was registered last.

These are the pure parts; ``cache_node.node`` calls them and does the I/O.
"""

from __future__ import annotations

import time

from api.schema import PipelineSpec
from cache_node.registry import PipelineRecord, ShardSet
from cache_node.snapshots import current_captures

__all__ = ["expired_retirement", "fold_pending", "promote", "set_pinned", "stage"]


def stage(existing: PipelineRecord, spec: PipelineSpec) -> PipelineRecord:
    """A staged record of ``spec`` beside the warm ``existing`` (not yet saved).

    It starts from what ``existing`` holds where that still applies (the same models: their
    files and blobs; the same TP sizes: their shard sets), so a change of ``pinned`` or an added
    TP size fetches nothing again.
    """
    generation = existing.generation
    if existing.pending is not None:
        generation = max(generation, existing.pending.generation)
    attempt = PipelineRecord(
        id=existing.id,
        tenant=existing.tenant,
        spec=spec,
        staged=True,
        generation=generation + 1,
        registered_at=time.time(),
    )
    if existing.spec.models == spec.models:
        attempt.models = [m.model_copy(deep=True) for m in existing.models]
        attempt.shards = {
            key: shard_set.model_copy(deep=True)
            for key, shard_set in existing.shards.items()
            if int(key) in spec.tp_sizes and shard_set.state == "ready"
        }
    return attempt


def promote(
    main: PipelineRecord, attempt: PipelineRecord, *, leases: list[str]
) -> tuple[PipelineRecord, dict[str, int]]:
    """The record after ``attempt`` (warm) takes ``main``'s place, and the blobs to free now.

    The old version's blobs the new one does not hold are retired: freed now (when nothing else
    references them, which the caller checks) if no lease is live, else kept with the leases
    live now until they end.
    """
    record = attempt.model_copy(deep=True)
    if main.pending is not None:  # a pin or unpin since the warm job copied its record
        record.spec.pinned = main.pending.spec.pinned
    record.staged = False
    record.pending = None
    record.state = "warm"
    record.error = None
    record.failures = 0
    record.evicted_reason = None
    record.registered_at = main.registered_at
    record.last_used_at = main.last_used_at
    record.loads = main.loads
    # engine artifacts of a model (and TP size) that did not change stay; the others go
    record.captures = current_captures(
        main.model_copy(update={"models": record.models, "spec": record.spec})
    )
    new_blobs = record.own_blobs()
    retired = {
        sha: size
        for sha, size in {**main.retired_blobs, **main.own_blobs()}.items()
        if sha not in new_blobs
    }
    if leases:
        record.retired_blobs = retired
        record.retired_leases = sorted(set(leases) | set(main.retired_leases))
        return record, {}
    record.retired_blobs = {}
    record.retired_leases = []
    return record, retired


def expired_retirement(record: PipelineRecord, *, live: list[str]) -> dict[str, int]:
    """Retired blobs whose leases have all ended (``live``: those of ``retired_leases`` still
    alive); clears them from ``record``. Empty when there is nothing to free yet."""
    if not record.retired_blobs or live:
        record.retired_leases = live
        return {}
    freed, record.retired_blobs, record.retired_leases = record.retired_blobs, {}, []
    return freed


def set_pinned(record: PipelineRecord, *, pinned: bool) -> bool:
    """Pin or unpin a pipeline in place, and the re-registration staged beside it (it takes
    the pipeline's place once warm, pin included). Returns whether anything changed.

    Only the flag changes: no new generation, so a warm job running keeps filling (its saves
    carry the stored flag over, ``CacheNode._save``), and nothing is fetched or resolved again.
    """
    specs = [record.spec] + ([record.pending.spec] if record.pending is not None else [])
    changed = any(spec.pinned != pinned for spec in specs)
    for spec in specs:
        spec.pinned = pinned
    return changed


def fold_pending(record: PipelineRecord) -> None:
    """Before an eviction: make the newest registered spec the record's own (bytes go anyway)."""
    attempt = record.pending
    if attempt is None:
        return
    record.spec = attempt.spec
    record.models = attempt.models
    record.shards = {k: ShardSet(tp_size=int(k), state="pending") for k in attempt.shards}
    record.generation = max(record.generation, attempt.generation)
    record.failures = 0
    record.pending = None
