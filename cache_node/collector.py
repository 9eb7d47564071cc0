"""Freeing what nothing holds: blobs of evicted or deleted pipelines, orphans of transfers
that outlived their pipeline, and a re-registered pipeline's old blobs once the leases taken
before the swap have ended (restage)."""

from __future__ import annotations

import logging
from collections.abc import Callable

from cache_node import restage
from cache_node.fetch import Fetcher
from cache_node.registry import PipelineRecord, Registry
from cache_node.store import BlobStore

log = logging.getLogger("weightcache.node")


class Collector:
    """Deletes unreferenced blobs; ``jobs_running`` says when orphans must wait."""

    def __init__(
        self,
        *,
        registry: Registry,
        store: BlobStore,
        fetcher: Fetcher,
        jobs_running: Callable[[], bool],
        on_change: Callable[[], None],
    ) -> None:
        self.registry = registry
        self.store = store
        self.fetcher = fetcher
        self.jobs_running = jobs_running
        self.on_change = on_change

    def free_unreferenced(self, blobs: dict[str, int]) -> int:
        """Delete those of ``blobs`` no pipeline references. Returns bytes freed."""
        still_used: set[str] = set()
        for other in self.registry.all():
            still_used.update(other.blobs())
        freed = sum(self.store.delete(sha) for sha in blobs if sha not in still_used)
        if freed:
            self.fetcher.verified.sweep()  # facts about a freed blob go with it
        return freed

    def collect_orphans(self) -> int:
        """Free the blobs no pipeline references, unless a warm job is running. Returns bytes.

        A transfer is shared and outlives a pipeline evicted or deleted while it was filling,
        so it can land as a blob nobody holds. A running job's blob is unreferenced from its
        commit until the job records it, so nothing is collected while any job runs.
        """
        if self.jobs_running():
            return 0
        referenced: set[str] = set()
        for record in self.registry.all():
            referenced.update(record.blobs())
        orphans = [r.sha256 for r in self.store.records() if r.sha256 not in referenced]
        freed = sum(self.store.delete(sha) for sha in orphans)
        if freed:
            log.info("freed %d bytes of %d blobs no pipeline holds", freed, len(orphans))
            self.fetcher.verified.sweep()
            self.on_change()
        return freed

    def free_retired(self) -> None:
        """Free the retired blobs of swapped pipelines whose pre-swap leases have all ended
        (expired ones too: the retry scheduler runs this on each pass)."""
        for record in list(self.registry.all()):
            self.free_retired_of(record)

    def free_retired_of(self, record: PipelineRecord) -> None:
        if not record.retired_blobs:
            return
        live = [lease for lease in record.retired_leases if self.registry.lease_alive(lease)]
        if live and live == record.retired_leases:
            return  # nothing changed
        freed = restage.expired_retirement(record, live=live)
        self.registry.put(record)
        if freed:
            self.free_unreferenced(freed)
            self.on_change()
