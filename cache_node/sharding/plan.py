"""The shard plan: what slice of every tensor each rank holds, decided without touching a byte.

``plan_rank_shards(config, headers, tp_size)`` applies the Llama-family rules (the table in
``cache_node.sharding``) to the tensors the safetensors headers list, and returns a frozen
:class:`ShardPlan`: per rank, the pieces in file order and the file's ``__metadata__``. The
writer (``cache_node.sharding.writer``) then carries the plan out; nothing here does I/O.

When a model cannot be split: TP size 1 and unknown (or quantized) architectures give a plan in
``"full"`` mode with the reason, and nothing is written: manifests point into the original files
and the engine slices. A Llama whose shapes do not divide by the TP size (``nH % N``, ``I % N``,
``nKV`` against ``N``) raises ``ShardingUnsupported``; the caller falls back to full-tensor mode
for that TP size and reports the message.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from cache_node.errors import InvalidInput, ShardingUnsupported
from cache_node.sharding.vocab import SHARD_LAYOUT, VOCAB_PADDING, padded_vocab_size, vocab_rows
from loader.safetensors_format import DTYPE_SIZES, SafetensorsHeader

__all__ = [
    "LLAMA_ARCHITECTURES",
    "LLAMA_MODEL_TYPES",
    "RankPlan",
    "RankTensor",
    "ShardPlan",
    "SourceTensor",
    "detect_family",
    "plan_rank_shards",
    "source_tensors",
]

#: ``model_type`` values whose checkpoints use Llama's names and layouts (and nothing fused).
LLAMA_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
#: The matching ``architectures`` entries: other heads on these bodies (sequence classifiers,
#: MoE variants, vision-language wrappers) have tensors these rules do not know.
LLAMA_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)

ShardMode = Literal["full", "sharded"]
Split = Literal["replicated", "rows", "columns"]


@dataclass(frozen=True)
class SourceTensor:
    """A tensor in an original safetensors file: ``nbytes`` bytes at absolute ``offset``."""

    file: str
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclass(frozen=True)
class RankTensor:
    """One rank's piece of a source tensor: ``[start, stop)`` along ``split``, then padding.

    ``rows`` slices dimension 0, ``columns`` dimension 1; ``pad_rows`` zero rows follow the
    slice (vocab padding). ``rule`` names the sharding rule that chose this.
    """

    source: SourceTensor
    rule: str
    split: Split
    start: int = 0
    stop: int = 0
    pad_rows: int = 0

    @property
    def name(self) -> str:
        """The Hugging Face name, kept unchanged in the rank's file."""
        return self.source.name

    @property
    def dtype(self) -> str:
        """The source dtype (never converted)."""
        return self.source.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of this rank's piece."""
        shape = list(self.source.shape)
        if self.split == "rows":
            shape[0] = self.stop - self.start + self.pad_rows
        elif self.split == "columns":
            shape[1] = self.stop - self.start
        return tuple(shape)

    @property
    def nbytes(self) -> int:
        """The bytes of this piece in the rank's file."""
        if self.split == "replicated":
            return self.source.nbytes
        return math.prod(self.shape) * DTYPE_SIZES[self.dtype]


@dataclass(frozen=True)
class RankPlan:
    """What one rank's file holds, in file order, and its ``__metadata__``."""

    rank: int
    tensors: tuple[RankTensor, ...]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """The size of the file's data section."""
        return sum(tensor.nbytes for tensor in self.tensors)


@dataclass(frozen=True)
class ShardPlan:
    """How a model splits for one TP size.

    ``mode == "full"``: nothing is written and ``ranks`` is empty (TP size 1, or an architecture
    these rules do not cover; ``reason`` says which). ``replicated_unrecognised`` names tensors
    no rule matched that every rank holds whole.
    """

    tp_size: int
    mode: ShardMode
    family: str | None
    reason: str
    ranks: tuple[RankPlan, ...] = ()
    replicated_unrecognised: tuple[str, ...] = ()
    vocab_size: int | None = None
    layout: str = SHARD_LAYOUT

    @property
    def vocab_padded(self) -> int | None:
        """The engine's padded vocabulary ``Vp`` (None when the model has no vocab tensor)."""
        return None if self.vocab_size is None else padded_vocab_size(self.vocab_size)


def detect_family(config: Mapping[str, Any]) -> Literal["llama"] | None:
    """``"llama"`` when ``config.json`` describes a Llama-layout causal LM, else ``None``.

    Both ``model_type`` and ``architectures`` must agree when present, and at least one must be.
    """
    model_type = config.get("model_type")
    architectures = config.get("architectures")
    if model_type is None and not architectures:
        return None
    if model_type is not None and model_type not in LLAMA_MODEL_TYPES:
        return None
    if architectures is not None and (not isinstance(architectures, list) or not all(
        arch in LLAMA_ARCHITECTURES for arch in architectures
    )):
        return None
    return "llama"


def source_tensors(headers: Mapping[str, SafetensorsHeader]) -> list[SourceTensor]:
    """Every tensor of ``headers`` (safetensors file name → parsed header), in file order."""
    return [
        SourceTensor(
            file=file,
            name=info.name,
            dtype=info.dtype,
            shape=info.shape,
            offset=info.absolute_offset(header.data_offset),
            nbytes=info.nbytes,
        )
        for file, header in sorted(headers.items())
        for info in header.tensors
    ]


def plan_rank_shards(
    config: Mapping[str, Any], headers: Mapping[str, SafetensorsHeader], tp_size: int
) -> ShardPlan:
    """Decide every tensor's split for ``tp_size`` ranks (no I/O).

    ``headers`` maps each safetensors file name of the model to its parsed header. Raises
    ``ShardingUnsupported`` when a Llama-family model's shapes do not divide by ``tp_size`` or
    do not match its config, and ``InvalidInput`` for a TP size below 1.
    """
    if tp_size < 1:
        raise InvalidInput(f"tp_size must be at least 1, not {tp_size}")
    family = detect_family(config)
    if tp_size == 1:
        return ShardPlan(tp_size, "full", family, "tp_size 1: the rank reads the original files")
    if family is None:
        kind = config.get("architectures") or config.get("model_type") or "unknown"
        return ShardPlan(
            tp_size, "full", None, f"architecture {kind} has no sharding rules: full-tensor mode"
        )
    if config.get("quantization_config") is not None:
        # Quantized layouts (packed ints, per-group scales) follow their own split rules.
        return ShardPlan(
            tp_size, "full", family, "quantized checkpoint has no sharding rules: full-tensor mode"
        )
    geometry = _Geometry.from_config(config, tp_size)
    tensors = sorted(
        source_tensors(headers),
        # Larger items first: the data section starts 8-byte aligned, so every tensor then
        # starts at a multiple of its own item size and can be viewed in place.
        key=lambda t: (-DTYPE_SIZES.get(t.dtype, 0), t.file, t.offset),
    )
    vocab_sizes = {t.shape[0] for t in tensors if _rule(t.name) == "vocab" and t.shape}
    if len(vocab_sizes) > 1:
        raise ShardingUnsupported(f"embed_tokens and lm_head disagree on vocab size: {vocab_sizes}")
    vocab_size = vocab_sizes.pop() if vocab_sizes else None
    declared = config.get("vocab_size")
    if vocab_size is not None and declared is not None and declared != vocab_size:
        # vLLM sizes its vocab layers from config.json and refuses a tensor of another size.
        raise ShardingUnsupported(
            f"config.json says vocab_size {declared}, the vocab tensors have {vocab_size} rows"
        )
    per_rank: list[list[RankTensor]] = [[] for _ in range(tp_size)]
    unrecognised: list[str] = []
    for tensor in tensors:
        rule = _rule(tensor.name)
        if rule == "unrecognised" and len(tensor.shape) == 1:
            rule = "replicated_1d"
        elif rule == "unrecognised":
            unrecognised.append(tensor.name)
        for rank in range(tp_size):
            per_rank[rank].append(geometry.piece(tensor, rule, rank))
    metadata = {
        "format": "pt",
        "weightcache.tp_size": str(tp_size),
        "weightcache.family": family,
        "weightcache.layout": SHARD_LAYOUT,
    }
    if vocab_size is not None:
        metadata["weightcache.vocab_size"] = str(vocab_size)
        metadata["weightcache.vocab_padding"] = str(VOCAB_PADDING)
        metadata["weightcache.vocab_padded"] = str(padded_vocab_size(vocab_size))
    ranks = tuple(
        RankPlan(rank, tuple(pieces), {**metadata, "weightcache.rank": str(rank)})
        for rank, pieces in enumerate(per_rank)
    )
    return ShardPlan(
        tp_size,
        "sharded",
        family,
        f"{family} rules, {tp_size} ranks",
        ranks,
        tuple(unrecognised),
        vocab_size,
    )


_RULES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), rule)
    for pattern, rule in (
        (r"(?:^|\.)(?:embed_tokens|lm_head)\.weight$", "vocab"),
        (r"\.self_attn\.q_proj\.(?:weight|bias)$", "q_heads"),
        (r"\.self_attn\.[kv]_proj\.(?:weight|bias)$", "kv_heads"),
        (r"\.self_attn\.o_proj\.weight$", "o_columns"),
        (r"\.mlp\.(?:gate|up)_proj\.(?:weight|bias)$", "mlp_rows"),
        (r"\.mlp\.down_proj\.weight$", "mlp_columns"),
        # A row-parallel layer's bias is added once after the partial sums are reduced.
        (r"\.(?:self_attn\.o_proj|mlp\.down_proj)\.bias$", "reduced_bias"),
        (r"norm\.(?:weight|bias)$", "norm"),
    )
)


def _rule(name: str) -> str:
    for pattern, rule in _RULES:
        if pattern.search(name):
            return rule
    return "unrecognised"


@dataclass(frozen=True)
class _Geometry:
    tp_size: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def from_config(cls, config: Mapping[str, Any], tp_size: int) -> _Geometry:
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            intermediate = int(config["intermediate_size"])
            kv_heads = int(config.get("num_key_value_heads") or heads)
            head_dim = int(config.get("head_dim") or hidden // heads)
        except (KeyError, TypeError, ValueError, ZeroDivisionError) as error:
            raise ShardingUnsupported(f"config.json lacks a usable {error}") from None
        if min(hidden, heads, kv_heads, head_dim, intermediate) <= 0 or heads % kv_heads:
            raise ShardingUnsupported(
                f"config.json has an impossible attention shape: {heads} heads, {kv_heads} KV "
                f"heads, head_dim {head_dim}, hidden {hidden}, intermediate {intermediate}"
            )
        problems = []
        if heads % tp_size:
            problems.append(f"num_attention_heads {heads} is not divisible by {tp_size}")
        if kv_heads % tp_size and tp_size % kv_heads:
            problems.append(
                f"num_key_value_heads {kv_heads} and tp_size {tp_size}: neither divides the other"
            )
        if intermediate % tp_size:
            problems.append(f"intermediate_size {intermediate} is not divisible by {tp_size}")
        if problems:
            raise ShardingUnsupported(
                f"cannot split for tp_size {tp_size}: {'; '.join(problems)}", tp_size=tp_size
            )
        return cls(tp_size, hidden, heads, kv_heads, head_dim, intermediate)

    def piece(self, tensor: SourceTensor, rule: str, rank: int) -> RankTensor:
        n, d = self.tp_size, self.head_dim
        if rule == "vocab":
            self._expect(tensor, (tensor.shape[0] if tensor.shape else -1, self.hidden))
            start, stop, pad_rows = vocab_rows(tensor.shape[0], n, rank)
            return RankTensor(tensor, rule, "rows", start, stop, pad_rows)
        if rule == "kv_heads" and self.kv_heads % n:
            # Fewer KV heads than ranks: each holds a copy of the one its query heads use.
            self._expect_projection(tensor, self.kv_heads * d)
            head = rank * self.kv_heads // n
            return RankTensor(tensor, rule, "rows", head * d, (head + 1) * d)
        by_rows = {"q_heads": self.heads * d, "kv_heads": self.kv_heads * d}
        by_rows["mlp_rows"] = self.intermediate
        by_columns = {"o_columns": self.heads * d, "mlp_columns": self.intermediate}
        if rule in by_rows:
            self._expect_projection(tensor, by_rows[rule])
            per_rank = by_rows[rule] // n  # whole heads: nH % N == 0 was checked
            return RankTensor(tensor, rule, "rows", rank * per_rank, (rank + 1) * per_rank)
        if rule in by_columns:
            self._expect(tensor, (self.hidden, by_columns[rule]))
            per_rank = by_columns[rule] // n
            return RankTensor(tensor, rule, "columns", rank * per_rank, (rank + 1) * per_rank)
        return RankTensor(tensor, rule, "replicated")

    def _expect_projection(self, tensor: SourceTensor, rows: int) -> None:
        # A weight is [rows, H]; its bias is [rows].
        is_bias = tensor.name.endswith(".bias")
        self._expect(tensor, (rows,) if is_bias else (rows, self.hidden))

    @staticmethod
    def _expect(tensor: SourceTensor, shape: tuple[int, ...]) -> None:
        if tensor.shape != shape:
            raise ShardingUnsupported(
                f"tensor {tensor.name!r} has shape {list(tensor.shape)}, config.json implies "
                f"{list(shape)}"
            )
        if tensor.dtype not in DTYPE_SIZES:
            raise ShardingUnsupported(
                f"tensor {tensor.name!r}: cannot split a sub-byte {tensor.dtype} tensor"
            )
