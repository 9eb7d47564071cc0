"""The eviction executor: asks the pure policy (``eviction``) for a plan and carries it out."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import eviction
from cache_node.registry import PipelineRecord, Registry
from cache_node.settings import EvictionSettings
from cache_node.store import BlobStore

log = logging.getLogger("weightcache.node")


def eviction_entry(
    record: PipelineRecord, *, leased: bool, present: Callable[[str], bool] | None = None
) -> eviction.Entry:
    """A pipeline as the policy sees it. ``present`` keeps only the blobs on disk: one that was
    quarantined (or is still being fetched again) frees nothing, and counting it would evict
    a pipeline for bytes that are not there, then answer 507 anyway."""
    blobs = record.blobs()
    if present is not None:
        blobs = {sha: size for sha, size in blobs.items() if present(sha)}
    return eviction.Entry(
        pipeline_id=record.key,
        blobs=blobs,
        last_used_at=record.last_used_at,
        registered_at=record.registered_at,
        pinned=record.spec.pinned,
        # a pipeline being filled (or a re-registration of it) is as untouchable as a leased one
        leased=leased
        or record.state == "warming"
        or (record.pending is not None and record.pending.state == "warming"),
        loads=record.loads,
    )


class Evictor:
    """Plans with the current entries, usage and limits; ``evict`` frees one pipeline."""

    def __init__(
        self,
        registry: Registry,
        store: BlobStore,
        settings: EvictionSettings,
        *,
        evict: Callable[[PipelineRecord, str], int],
    ) -> None:
        self.registry = registry
        self.store = store
        self.settings = settings
        self._evict = evict
        # one plan at a time: two concurrent plans could both count the same victim's bytes
        self._lock = threading.Lock()

    def make_room(self, nbytes: int, *, keep: frozenset[str] = frozenset()) -> int:
        """Evict so ``nbytes`` more fit; an unsatisfiable plan evicts nothing (the caller
        answers 507). Pipelines holding a blob of ``keep`` (those a registration will use as
        they are) are not evicted: that would free bytes the registration then fetches again.
        Returns bytes freed."""
        with self._lock:
            plan = eviction.plan(
                self._entries(keep),
                need_bytes=nbytes,
                usage=self._usage(),
                limits=self._limits(),
                now=time.time(),
            )
            return self._execute(plan)

    def enforce_watermarks(self) -> int:
        """Above the high watermark, evict cold pipelines down to the low one. Returns bytes."""
        with self._lock:
            plan = eviction.plan_watermark(
                self._entries(), usage=self._usage(), limits=self._limits(), now=time.time()
            )
            return self._execute(plan)

    def _entries(self, keep: frozenset[str] = frozenset()) -> list[eviction.Entry]:
        leases = self.registry.active_leases()
        return [
            eviction_entry(
                record,
                leased=bool(leases.get(record.key)) or not keep.isdisjoint(record.blobs()),
                present=self.store.has,
            )
            for record in self.registry.all()
            if record.blobs()
        ]

    def _limits(self) -> eviction.Limits:
        return eviction.Limits(
            capacity=self._capacity(),
            high_watermark=self.settings.high_watermark,
            low_watermark=self.settings.low_watermark,
            hot_window_s=self.settings.hot_window_s,
        )

    def _capacity(self) -> int:
        """The configured capacity, or less when the filesystem cannot hold that much: then
        evicting for a fill frees what the disk, not the promise, lacks (I5)."""
        usage = self.store.usage()
        if usage.filesystem_free is None:
            return self.store.capacity
        on_disk = usage.committed + usage.reserved + usage.temp
        return max(0, min(self.store.capacity, on_disk + usage.filesystem_free))

    def _usage(self) -> eviction.Usage:
        usage = self.store.usage()
        return eviction.Usage(committed=usage.committed, reserved=usage.reserved + usage.temp)

    def _execute(self, plan: eviction.EvictionPlan) -> int:
        freed = 0
        for victim in plan.victims:
            tenant, _, pipeline_id = victim.pipeline_id.partition("/")
            record = self.registry.get(tenant, pipeline_id)
            if record is None:
                continue
            log.info("evicting %s (%s): %s", victim.pipeline_id, victim.reason, plan.reason)
            freed += self._evict(record, victim.reason)
        return freed
