"""The engine's vocab layout: how vocab-parallel tensors are padded and cut across ranks.

Vocab-parallel tensors (``embed_tokens``, ``lm_head``) follow the engine exactly (vLLM's
``VocabParallelEmbedding`` and ``ParallelLMHead``): the vocabulary is padded to ``Vp``, the next
multiple of :data:`VOCAB_PADDING` (64), and rank ``r`` holds rows ``[r·Vp/N, (r+1)·Vp/N) ∩
[0, V)`` followed by zero rows, so its piece has exactly ``Vp/N`` rows: the shape of the
engine's parameter. vLLM asserts that ``N`` divides ``Vp``; so does :func:`vocab_rows`. The rule
is named by :data:`SHARD_LAYOUT`, written into every rank file's metadata (with ``V`` and
``Vp``) and into the shard set, so shards cut by another rule are never served as if they were
cut by this one.
"""

from __future__ import annotations

from cache_node.errors import ShardingUnsupported

__all__ = ["SHARD_LAYOUT", "VOCAB_PADDING", "padded_vocab_size", "vocab_rows"]

#: vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``: vocab-parallel layers pad V up to a multiple of this.
VOCAB_PADDING = 64
#: The name of the layout rank shards are cut in. Part of every shard set and rank file: a shard
#: set written under another name (an older rule, another engine) is rebuilt, never served.
SHARD_LAYOUT = f"vllm-vocab-pad{VOCAB_PADDING}"


def padded_vocab_size(vocab_size: int, pad_to: int = VOCAB_PADDING) -> int:
    """``V`` rounded up to a multiple of ``pad_to``, as vLLM's ``pad_vocab_size`` does."""
    return -(-vocab_size // pad_to) * pad_to


def vocab_rows(vocab_size: int, tp_size: int, rank: int) -> tuple[int, int, int]:
    """Rank ``rank``'s vocab rows as ``(start, stop, pad_rows)``: real rows ``[start, stop)``,
    then ``pad_rows`` zero rows, ``Vp/N`` rows in all (vLLM's ``VocabParallelEmbedding``).

    Raises ``ShardingUnsupported`` when ``N`` does not divide ``Vp`` (vLLM asserts the same).
    """
    padded = padded_vocab_size(vocab_size)
    if padded % tp_size:
        raise ShardingUnsupported(
            f"the padded vocabulary ({vocab_size} rows padded to {padded}, a multiple of "
            f"{VOCAB_PADDING}) does not split evenly over tp_size {tp_size}",
            tp_size=tp_size,
        )
    per_rank = padded // tp_size
    start = min(rank * per_rank, vocab_size)
    stop = min((rank + 1) * per_rank, vocab_size)
    return start, stop, per_rank - (stop - start)
