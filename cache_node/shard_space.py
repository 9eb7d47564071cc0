"""How many bytes a pipeline's TP shard sets take, known before any origin byte (I5).

A shard set is a function of the model's files, its ``config.json`` and the TP size, so:

- **Exact, when the files are here.** With every weight file and the config on disk (a model
  the node holds), the plan is computed from the local headers: the bytes are exact
  (:func:`exact_shard_bytes`).
- **Already written, when another pipeline has it.** A ready shard set built from the very same
  blobs is reused (:func:`find_reusable`): it costs nothing, and a second tenant registering a
  model the node holds writes nothing and evicts nobody.
- **An estimate, then exact, when the files are still to fetch.** A safetensors header is
  only known once read, so the registration reserves :func:`estimate_shard_bytes`: for a model
  that has a ``config.json``, the weight files' bytes once per TP size above 1 (the ranks of a
  split tensor add up to the tensor), plus a header allowance per rank; a model without a
  config is never split and costs nothing. A 507 on that estimate costs the origin nothing.
  Then the warm job, before the first weight byte, reads the config and the headers ahead
  (ranged reads of a few KiB: ``cache_node.shard_headers``) and trues the reservation up to the
  exact size (replicated tensors, vocab padding and copied KV heads make it differ): the
  excess goes back at once, a shortfall is reserved or fails the job with
  ``insufficient_storage`` before any weight byte. When the read-ahead is impossible (origin
  error, a huge header) that is logged (``shards.estimated``) and the exact size is carved
  when the shards are written (:func:`cache_node.shard_sets.write_shard_set`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from cache_node import sharding
from cache_node.registry import FileEntry, ModelEntry, PipelineRecord, RankShard, Registry, ShardSet
from cache_node.store import BlobStore
from loader.errors import HeaderError
from loader.safetensors_format import SafetensorsHeader, encode_header, read_header

#: The estimate's room for each rank file's safetensors header beyond the source's.
RANK_HEADER_ALLOWANCE = 64 * 1024

#: (model name, file path) → the stored blob that will hold that file (what the node's
#: reservation found on disk: the declared sha256, or the blob an earlier transfer of the same
#: object made). For sizing only: which blob a pipeline may use is the fetcher's decision, and
#: a warm job looks for a reusable shard set again with the blobs it finally got.
Held = Mapping[tuple[str, str], str]
_NONE: Held = MappingProxyType({})


def plan_file_sizes(plan: sharding.ShardPlan) -> list[int]:
    """The exact size of every rank file ``plan`` writes (header, then data)."""
    sizes = []
    for rank in plan.ranks:
        header, _ = encode_header(
            [(t.name, t.dtype, t.shape, t.nbytes) for t in rank.tensors], rank.metadata
        )
        sizes.append(len(header) + rank.nbytes)
    return sizes


def _weights(model: ModelEntry) -> list[str]:
    return [f.path for f in model.files if f.path.endswith(".safetensors")]


def exact_shard_bytes(
    store: BlobStore, record: PipelineRecord, tp_size: int, held: Held = _NONE
) -> int | None:
    """The bytes the TP-``tp_size`` shard set will take, or None when files are not here yet."""
    from cache_node.shard_sets import model_config  # shard_sets imports this module

    if tp_size == 1:
        return 0
    total = 0
    for model in record.models:
        blobs = {f.path: held_blob(store, model.name, f, held) for f in model.files}
        needed = [*_weights(model), *(["config.json"] if "config.json" in blobs else [])]
        if any(not blobs[path] or not store.has(str(blobs[path])) for path in needed):
            return None
        local = model.model_copy(
            update={"files": [f.model_copy(update={"blob": blobs[f.path]}) for f in model.files]}
        )
        try:
            headers = {
                path: read_header(store.blob_path(str(blobs[path]))) for path in _weights(model)
            }
            plan = sharding.plan_rank_shards(model_config(store, local), headers, tp_size)
        except (HeaderError, sharding.ShardingUnsupported, OSError):
            return 0  # written in full-tensor mode: nothing
        if plan.mode == "full":
            return 0  # one model in full mode makes the whole TP size full-tensor mode
        total += sum(plan_file_sizes(plan))
    return total


def estimate_shard_bytes(record: PipelineRecord, tp_size: int) -> int:
    """The up-front reservation for a shard set whose files are not all here (see above)."""
    if tp_size == 1:
        return 0
    if any("config.json" not in {f.path for f in m.files} for m in record.models):
        return 0  # no config, no family: full-tensor mode, nothing written
    weights = sum(
        f.size for m in record.models for f in m.files if f.path.endswith(".safetensors")
    )
    return weights + tp_size * RANK_HEADER_ALLOWANCE * len(record.models)




def held_blob(store: BlobStore, model: str, file: FileEntry, held: Held) -> str | None:
    if file.blob:
        return file.blob
    found = held.get((model, file.path))
    if found is not None and store.has(found):
        return found
    return None


def _blob_key(
    store: BlobStore, record: PipelineRecord, held: Held
) -> tuple[tuple[tuple[str, str | None], ...], ...] | None:
    """What a shard set is derived from: every model's (path, blob), in model order."""
    key = tuple(
        tuple(sorted((f.path, held_blob(store, m.name, f, held)) for f in m.files))
        for m in record.models
    )
    if not key or any(blob is None for model in key for _, blob in model):
        return None
    return key


def find_reusable(
    registry: Registry, store: BlobStore, record: PipelineRecord, tp_size: int, held: Held = _NONE
) -> ShardSet | None:
    """A ready TP-``tp_size`` shard set another pipeline built from the same blobs, renamed
    for ``record``'s model names; None when there is none (or its blobs are gone)."""
    key = _blob_key(store, record, held)
    if key is None:
        return None
    for other in registry.all():
        if other.key == record.key or _blob_key(store, other, {}) != key:
            continue
        shard_set = other.shards.get(str(tp_size))
        if shard_set is None or shard_set.state != "ready":
            continue
        if not all(store.has(r.blob) for r in shard_set.ranks):
            continue
        if not (shard_set.mode == "full" or shard_set.layout == sharding.SHARD_LAYOUT):
            continue  # cut by another layout: never handed on, rebuilt instead
        names = {o.name: m.name for o, m in zip(other.models, record.models, strict=True)}
        return ShardSet(
            tp_size=tp_size,
            state="ready",
            mode=shard_set.mode,
            note=shard_set.note,
            layout=shard_set.layout,
            vocab_sizes={names[m]: v for m, v in shard_set.vocab_sizes.items() if m in names},
            vocab_padding=shard_set.vocab_padding,
            ranks=[
                RankShard(
                    model=names[r.model],
                    rank=r.rank,
                    blob=r.blob,
                    size=r.size,
                    tensors=[t.model_copy(update={"model": names[t.model]}) for t in r.tensors],
                )
                for r in shard_set.ranks
            ],
        )
    return None


@dataclass(frozen=True)
class ShardNeed:
    """The shard sets' up-front reservation: ``known`` bytes (exact, or nothing for a set
    already written) plus the estimate for the TP sizes in ``estimated``."""

    known: int = 0
    estimate: int = 0
    estimated: tuple[int, ...] = ()

    @property
    def total(self) -> int:
        return self.known + self.estimate


def shard_bytes_to_reserve(
    registry: Registry, store: BlobStore, record: PipelineRecord, held: Held
) -> ShardNeed:
    """The physical bytes the pipeline's shard sets still need: 0 for one already written
    (here or by another pipeline), exact when the files are here, else the estimate."""
    known = estimate = 0
    estimated: list[int] = []
    for tp_size in record.spec.tp_sizes:
        if tp_size == 1:
            continue
        existing = record.shards.get(str(tp_size))
        if existing is not None and existing.state == "ready" and all(
            store.has(r.blob) for r in existing.ranks
        ):
            continue
        if find_reusable(registry, store, record, tp_size, held) is not None:
            continue
        exact = exact_shard_bytes(store, record, tp_size, held)
        if exact is None:
            estimate += estimate_shard_bytes(record, tp_size)
            estimated.append(tp_size)
        else:
            known += exact
    return ShardNeed(known, estimate, tuple(estimated))


def shard_set_bytes(
    models: Sequence[tuple[Mapping[str, Any], Mapping[str, SafetensorsHeader]]], tp_size: int
) -> int:
    """The bytes of one TP size's shard set for these (config, headers) models: 0 when any
    model is served in full-tensor mode (then the whole TP size is)."""
    total = 0
    for config, headers in models:
        try:
            plan = sharding.plan_rank_shards(config, headers, tp_size)
        except sharding.ShardingUnsupported:
            return 0
        if plan.mode == "full":
            return 0
        total += sum(plan_file_sizes(plan))
    return total
