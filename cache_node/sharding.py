"""Tensor-parallel rank shards for the Llama family: a pure plan, then one file per rank.

``plan_rank_shards(config, headers, tp_size)`` decides, without touching a byte, what slice of
every tensor each rank holds (the rules of ARCHITECTURE.md, "TP sharding rules"):

==================================================  ===========================================
tensor                                              each rank holds
==================================================  ===========================================
``embed_tokens.weight``, ``lm_head.weight`` [V, H]   ``Vp/N`` rows in vLLM's layout (see below)
``q_proj`` weight [nH·d, H] and bias                 the rows of its ``nH/N`` query heads
``k_proj``, ``v_proj`` [nKV·d, H] and biases         its ``nKV/N`` KV heads; when N > nKV, the
                                                     rows of KV head ``rank·nKV // N`` (copied)
``o_proj`` [H, nH·d], ``down_proj`` [H, I]           its columns (written contiguous)
``gate_proj``, ``up_proj`` [I, H] and biases         its ``I/N`` rows
``o_proj.bias``, ``down_proj.bias``, norms, 1-D      everything (added once, after the reduce)
anything else                                        everything, and the plan names it
==================================================  ===========================================

Vocab-parallel tensors follow the engine exactly (vLLM's ``VocabParallelEmbedding`` and
``ParallelLMHead``): the vocabulary is padded to ``Vp``, the next multiple of
:data:`VOCAB_PADDING` (64), and rank ``r`` holds rows ``[r·Vp/N, (r+1)·Vp/N) ∩ [0, V)`` followed
by zero rows, so its piece has exactly ``Vp/N`` rows: the shape of the engine's parameter. vLLM
asserts that ``N`` divides ``Vp``; so does the plan. The rule is named by :data:`SHARD_LAYOUT`,
written into every rank file's metadata (with ``V`` and ``Vp``) and into the shard set, so shards
cut by another rule are never served as if they were cut by this one.

``write_rank_shards(plan, sources, out_dir)`` then reads each source tensor once (a bounded
block at a time) and writes every rank's slice of it, so one pass over the model writes all N
safetensors files, hashing them while they are written.

When a model cannot be split: TP size 1 and unknown (or quantized) architectures give a plan in
``"full"`` mode with the reason, and nothing is written: manifests point into the original files
and the engine slices. A Llama whose shapes do not divide by the TP size (``nH % N``, ``I % N``,
``nKV`` against ``N``) raises ``ShardingUnsupported``; the caller falls back to full-tensor mode
for that TP size and reports the message.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import numpy as np

from cache_node.errors import IntegrityError, InvalidInput
from loader.digests import CHUNK_SIZE, BlobHasher
from loader.preads import read_into_at
from loader.safetensors_format import DTYPE_SIZES, SafetensorsHeader, encode_header

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
    "vocab_rows",
    "write_rank_shards",
]

#: How many source bytes are read at once while writing: memory stays bounded by about this
#: (plus one row when a single row is larger), whatever the model's size.
_BLOCK_SIZE = 16 * 1024 * 1024

#: ``model_type`` values whose checkpoints use Llama's names and layouts (and nothing fused).
LLAMA_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})
#: The matching ``architectures`` entries: other heads on these bodies (sequence classifiers,
#: MoE variants, vision-language wrappers) have tensors these rules do not know.
LLAMA_ARCHITECTURES = frozenset(
    {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}
)

#: vLLM's ``DEFAULT_VOCAB_PADDING_SIZE``: vocab-parallel layers pad V up to a multiple of this.
VOCAB_PADDING = 64
#: The name of the layout rank shards are cut in. Part of every shard set and rank file: a shard
#: set written under another name (an older rule, another engine) is rebuilt, never served.
SHARD_LAYOUT = f"vllm-vocab-pad{VOCAB_PADDING}"

ShardMode = Literal["full", "sharded"]
Split = Literal["replicated", "rows", "columns"]


class ShardingUnsupported(InvalidInput):
    """This model cannot be split for this TP size; serve it in full-tensor mode instead."""

    code = "unshardable"


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


@dataclass(frozen=True)
class ShardTensorEntry:
    """A tensor of a written rank file: ``length`` bytes at absolute ``offset``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class RankShardFile:
    """A rank's safetensors file as written (under a temporary name, fsynced, not published)."""

    rank: int
    tp_size: int
    path: Path
    size: int
    sha256: str
    chunk_size: int
    chunk_xxh3_128: tuple[str, ...]
    tensors: tuple[ShardTensorEntry, ...]


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


def write_rank_shards(
    plan: ShardPlan,
    sources: Mapping[str, Path],
    out_dir: Path,
    *,
    chunk_size: int = CHUNK_SIZE,
    block_size: int = _BLOCK_SIZE,
) -> list[RankShardFile]:
    """Write one safetensors file per rank of ``plan`` into ``out_dir``; ``[]`` in full mode.

    ``sources`` maps each safetensors file name the plan uses to its path. Files get unique
    temporary names and are fsynced; the caller verifies, renames and records them. On any
    error every file this call created is removed.
    """
    if plan.mode == "full":
        return []
    missing = {t.source.file for t in plan.ranks[0].tensors} - sources.keys()
    if missing:
        raise InvalidInput(f"no path given for source files {sorted(missing)}")
    writers: list[_HashingWriter] = []
    inputs: dict[str, BinaryIO] = {}
    try:
        for rank_plan in plan.ranks:
            writers.append(_HashingWriter.create(out_dir, plan.tp_size, rank_plan.rank, chunk_size))
        headers = []
        for rank_plan, writer in zip(plan.ranks, writers, strict=True):
            header, starts = encode_header(
                [(t.name, t.dtype, t.shape, t.nbytes) for t in rank_plan.tensors],
                rank_plan.metadata,
            )
            writer.write(header)
            headers.append((len(header), starts))
        # Every rank lists the same source tensors in the same order (the plan builds them so):
        # one read of each source tensor feeds all the ranks' files.
        for pieces in zip(*(rank_plan.tensors for rank_plan in plan.ranks), strict=True):
            source = pieces[0].source
            if source.file not in inputs:
                inputs[source.file] = Path(sources[source.file]).open("rb")
            _copy_pieces(inputs[source.file], pieces, writers, block_size)
        results = []
        for rank_plan, writer, (header_len, starts) in zip(
            plan.ranks, writers, headers, strict=True
        ):
            writer.finish()
            entries = tuple(
                ShardTensorEntry(t.name, t.dtype, t.shape, header_len + start, t.nbytes)
                for t, start in zip(rank_plan.tensors, starts, strict=True)
            )
            results.append(writer.result(rank_plan.rank, plan.tp_size, entries))
        return results
    except BaseException:
        for writer in writers:
            writer.discard()
        raise
    finally:
        for handle in inputs.values():
            handle.close()


def _copy_pieces(
    source_file: BinaryIO,
    pieces: Sequence[RankTensor],
    writers: Sequence[_HashingWriter],
    block_size: int,
) -> None:
    source = pieces[0].source
    if all(piece.split == "replicated" for piece in pieces):
        for block in _read_blocks(source_file, source.offset, source.nbytes, block_size):
            for writer in writers:
                writer.write(block)
        return
    # Split tensors are viewed as [rows, row_bytes] of raw bytes: slicing bytes is the same for
    # every whole-byte dtype, so bf16, fp8 and fp32 need no conversion.
    rows = source.shape[0]
    row_bytes = source.nbytes // rows if rows else 0
    col_bytes = row_bytes // source.shape[1] if len(source.shape) > 1 and source.shape[1] else 0
    rows_per_block = max(1, block_size // max(row_bytes, 1))
    first = 0
    for block in _read_blocks(
        source_file, source.offset, source.nbytes, rows_per_block * row_bytes
    ):
        last = first + len(block) // row_bytes
        for piece, writer in zip(pieces, writers, strict=True):
            if piece.split == "replicated":
                writer.write(block)
            elif piece.split == "rows":
                lo, hi = max(first, piece.start), min(last, piece.stop)
                if lo < hi:
                    writer.write(block[(lo - first) * row_bytes : (hi - first) * row_bytes])
            else:
                grid = np.frombuffer(block, dtype=np.uint8).reshape(last - first, row_bytes)
                columns = grid[:, piece.start * col_bytes : piece.stop * col_bytes]
                writer.write(np.ascontiguousarray(columns).data)
        first = last
    for piece, writer in zip(pieces, writers, strict=True):
        writer.write_zeros(piece.pad_rows * row_bytes)


def _read_blocks(
    handle: BinaryIO, offset: int, length: int, block_size: int
) -> Iterator[memoryview]:
    """``length`` bytes from ``offset`` in blocks of at most ``block_size``, by positioned reads."""
    fd = handle.fileno()
    end = offset + length
    while offset < end:
        want = min(max(block_size, 1), end - offset)
        view = memoryview(bytearray(want))
        got = read_into_at(fd, view, offset)
        if got < want:
            # The plan came from this file's header: a shorter file is a damaged blob.
            raise IntegrityError(
                f"source file ends at byte {offset + got}; a tensor needs bytes up to {end}"
            )
        offset += want
        yield view


class _HashingWriter:
    """A temp file that hashes (sha256 and per-chunk xxh3-128) everything written to it."""

    _ZEROS = bytes(1024 * 1024)

    def __init__(self, path: Path, handle: BinaryIO, chunk_size: int) -> None:
        self.path = path
        self._handle = handle
        self._hasher = BlobHasher(chunk_size=chunk_size)

    @classmethod
    def create(cls, out_dir: Path, tp_size: int, rank: int, chunk_size: int) -> _HashingWriter:
        # A unique name per writer: two shard jobs for one model never write the same file.
        fd, name = tempfile.mkstemp(
            dir=out_dir, prefix=f".tp{tp_size}-rank{rank}-", suffix=".safetensors.tmp"
        )
        return cls(Path(name), os.fdopen(fd, "wb"), chunk_size)

    def write(self, data: bytes | memoryview) -> None:
        # Flat bytes: a numpy buffer's memoryview is n-dimensional and len() counts its rows.
        view = memoryview(data).cast("B")
        self._handle.write(view)
        self._hasher.update(view)

    def write_zeros(self, count: int) -> None:
        while count > 0:
            take = min(count, len(self._ZEROS))
            self.write(self._ZEROS[:take])
            count -= take

    def finish(self) -> None:
        """Flush and fsync: the bytes are on disk before anyone hashes or publishes them."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def discard(self) -> None:
        self._handle.close()
        self.path.unlink(missing_ok=True)

    def result(
        self, rank: int, tp_size: int, tensors: tuple[ShardTensorEntry, ...]
    ) -> RankShardFile:
        return RankShardFile(
            rank=rank,
            tp_size=tp_size,
            path=self.path,
            size=self._hasher.size,
            sha256=self._hasher.sha256_hex,
            chunk_size=self._hasher.chunk_size,
            chunk_xxh3_128=tuple(self._hasher.chunks()),
            tensors=tensors,
        )
