"""The evictor tells the policy only the blobs a pipeline holds on disk (the policy's contract).

A pipeline keeps referencing a blob that was quarantined (or freed under it) until its re-warm
fetches it again. Counted, that blob made a plan look satisfiable: the evictor then evicted
pipelines for bytes that were not there, and the registration got its 507 anyway, with warm
pipelines gone for nothing (found by the state-machine test).
"""

from __future__ import annotations

import time

import eviction
from api.schema import ModelSpec, PipelineSpec
from cache_node.evictor import eviction_entry
from cache_node.registry import FileEntry, ModelEntry, PipelineRecord

ON_DISK, QUARANTINED = "a" * 64, "b" * 64


def _record(pipeline_id: str) -> PipelineRecord:
    files = [
        FileEntry(path="one.safetensors", size=100, blob=ON_DISK),
        FileEntry(path="two.safetensors", size=900, blob=QUARANTINED),
    ]
    return PipelineRecord(
        id=pipeline_id,
        tenant="default",
        spec=PipelineSpec(models=[ModelSpec(name="m", source="file:///models/m")]),
        state="cold",
        models=[ModelEntry(name="m", source="file:///models/m", files=files)],
        registered_at=time.time() - 3600,
    )


def test_a_blob_not_on_disk_is_not_offered_to_the_policy() -> None:
    entry = eviction_entry(_record("p"), leased=False, present=lambda sha: sha == ON_DISK)
    assert dict(entry.blobs) == {ON_DISK: 100}


def test_a_plan_never_counts_bytes_that_are_not_there() -> None:
    limits = eviction.Limits(capacity=1000, high_watermark=0.9, low_watermark=0.5,
                             hot_window_s=0.0)
    usage = eviction.Usage(committed=100)  # the quarantined blob is not on disk
    need = 1300  # free is 900: only evicting 400 more would do, and only 100 can be freed

    def plan(entry: eviction.Entry) -> eviction.EvictionPlan:
        return eviction.plan([entry], need_bytes=need, usage=usage, limits=limits,
                             now=time.time())

    stale = plan(eviction_entry(_record("p"), leased=False))
    assert stale.victims, "counting the quarantined blob, the plan believes it can make room"
    assert not plan(
        eviction_entry(_record("p"), leased=False, present=lambda sha: sha == ON_DISK)
    ).victims
