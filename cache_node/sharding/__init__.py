"""Tensor-parallel rank shards for the Llama family: a pure plan, then one file per rank.

``plan_rank_shards(config, headers, tp_size)`` (``sharding.plan``) decides, without touching a
byte, what slice of every tensor each rank holds (the rules of ARCHITECTURE.md, "TP sharding
rules"):

==================================================  ===========================================
tensor                                              each rank holds
==================================================  ===========================================
``embed_tokens.weight``, ``lm_head.weight`` [V, H]   ``Vp/N`` rows in vLLM's layout (``vocab``)
``q_proj`` weight [nH·d, H] and bias                 the rows of its ``nH/N`` query heads
``k_proj``, ``v_proj`` [nKV·d, H] and biases         its ``nKV/N`` KV heads; when N > nKV, the
                                                     rows of KV head ``rank·nKV // N`` (copied)
``o_proj`` [H, nH·d], ``down_proj`` [H, I]           its columns (written contiguous)
``gate_proj``, ``up_proj`` [I, H] and biases         its ``I/N`` rows
``o_proj.bias``, ``down_proj.bias``, norms, 1-D      everything (added once, after the reduce)
anything else                                        everything, and the plan names it
==================================================  ===========================================

``write_rank_shards(plan, sources, out_dir)`` (``sharding.writer``) then reads each source
tensor once and writes every rank's slice of it, so one pass over the model writes all N
safetensors files. ``sharding.vocab`` holds the engine's vocab layout (:data:`SHARD_LAYOUT`),
which every rank file and shard set records.
"""

from cache_node.errors import ShardingUnsupported
from cache_node.sharding.plan import (
    LLAMA_ARCHITECTURES,
    LLAMA_MODEL_TYPES,
    RankPlan,
    RankTensor,
    ShardPlan,
    SourceTensor,
    detect_family,
    plan_rank_shards,
    source_tensors,
)
from cache_node.sharding.vocab import SHARD_LAYOUT, VOCAB_PADDING, padded_vocab_size, vocab_rows
from cache_node.sharding.writer import RankShardFile, ShardTensorEntry, write_rank_shards
from loader.digests import CHUNK_SIZE

__all__ = [
    "CHUNK_SIZE",
    "LLAMA_ARCHITECTURES",
    "LLAMA_MODEL_TYPES",
    "SHARD_LAYOUT",
    "VOCAB_PADDING",
    "RankPlan",
    "RankShardFile",
    "RankTensor",
    "ShardPlan",
    "ShardTensorEntry",
    "ShardingUnsupported",
    "SourceTensor",
    "detect_family",
    "padded_vocab_size",
    "plan_rank_shards",
    "source_tensors",
    "vocab_rows",
    "write_rank_shards",
]
