"""Writing a pipeline's rank shards for one TP size and publishing them as blobs.

The split rules live in ``cache_node.sharding``; this module feeds it the pipeline's verified
files and turns what it writes into content-addressed blobs charged to the pipeline.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from api.schema import ManifestTensor
from cache_node import sharding
from cache_node.registry import ModelEntry, PipelineRecord, RankShard, ShardSet
from cache_node.store import BlobStore
from loader.errors import HeaderError
from loader.safetensors_format import read_header


def is_current(shard_set: ShardSet) -> bool:
    """Whether ``shard_set`` can be served as it is: full mode, or cut by today's layout.

    A sharded set written by another rule (an older vocab split, another engine's layout) must
    be rebuilt: its ranks would load without a shape error yet hold the wrong rows.
    """
    return shard_set.mode == "full" or shard_set.layout == sharding.SHARD_LAYOUT


#: Room reserved for each rank file's safetensors header beyond its tensor bytes.
_HEADER_ALLOWANCE = 1 << 20


def write_shard_set(
    store: BlobStore,
    record: PipelineRecord,
    tp_size: int,
    *,
    verify_blob: Callable[[str], None],
) -> ShardSet:
    """Plan and write every model's rank shards for one TP size, then publish them.

    A model the rules do not cover makes the whole TP size full-tensor mode (every rank
    reads the unsplit files), which is correct for anything. ``verify_blob`` checks a source
    blob's chunks first: shards inherit their source's bytes.
    """
    plans = []
    for model in record.models:
        config = model_config(store, model)
        weights = {
            f.path: store.blob_path(f.blob)
            for f in model.files
            if f.path.endswith(".safetensors") and f.blob
        }
        for path in weights.values():
            verify_blob(path.name)
        try:
            headers = {path: read_header(blob) for path, blob in weights.items()}
            plan = sharding.plan_rank_shards(config, headers, tp_size)
        except (HeaderError, sharding.ShardingUnsupported) as exc:
            return ShardSet(tp_size=tp_size, state="ready", mode="full", note=str(exc))
        if plan.mode == "full":
            return ShardSet(tp_size=tp_size, state="ready", mode="full", note=plan.reason)
        plans.append((model, plan, weights))
    ranks: list[RankShard] = []
    for model, plan, weights in plans:
        # one reservation per rank file, each handed to publish, so committed + reserved
        # never counts a shard twice
        reservations = [store.reserve(r.nbytes + _HEADER_ALLOWANCE) for r in plan.ranks]
        try:
            for shard in sharding.write_rank_shards(plan, weights, store.tmp_dir):
                blob = store.publish(
                    shard.path,
                    sha256=shard.sha256,
                    size=shard.size,
                    chunk_xxh3_128=list(shard.chunk_xxh3_128),
                    verified=True,
                    reservation=reservations[shard.rank],
                )
                tensors = [
                    ManifestTensor(
                        model=model.name,
                        name=t.name,
                        dtype=t.dtype,
                        shape=list(t.shape),
                        blob=blob.sha256,
                        offset=t.offset,
                        length=t.length,
                    )
                    for t in shard.tensors
                ]
                ranks.append(
                    RankShard(
                        model=model.name,
                        rank=shard.rank,
                        blob=blob.sha256,
                        size=blob.size,
                        tensors=tensors,
                    )
                )
        finally:
            for reservation in reservations:
                reservation.release()
    vocab_sizes = {
        model.name: plan.vocab_size for model, plan, _ in plans if plan.vocab_size is not None
    }
    return ShardSet(
        tp_size=tp_size,
        state="ready",
        mode="sharded",
        ranks=ranks,
        layout=sharding.SHARD_LAYOUT,
        vocab_sizes=vocab_sizes,
        vocab_padding=sharding.VOCAB_PADDING if vocab_sizes else None,
    )


def model_config(store: BlobStore, model: ModelEntry) -> dict[str, Any]:
    """The model's ``config.json`` as a dict ({} when it has none or it does not parse)."""
    for file in model.files:
        if file.path == "config.json" and file.blob:
            try:
                raw = json.loads(store.blob_path(file.blob).read_bytes())
            except (OSError, ValueError):
                return {}
            return raw if isinstance(raw, dict) else {}
    return {}
