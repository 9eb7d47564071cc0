"""TP rank shards are faithful: they rebuild every tensor bit for bit, partial forward passes
summed over ranks equal the full blocks, and each rank holds exactly its share of the bytes.

The expectations here are computed from ``config.json`` and the original tensors, never from the
plan under test.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
import xxhash
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import (
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from cache_node.errors import IntegrityError, InvalidInput
from cache_node.sharding import (
    RankShardFile,
    ShardingUnsupported,
    ShardPlan,
    detect_family,
    plan_rank_shards,
    write_rank_shards,
)
from loader.safetensors_format import SafetensorsHeader, read_header
from tests.fixtures.tiny_llama import make_tiny_llama

WEIGHTS = "model.safetensors"
TP_SIZES = (2, 4, 8)
# Smaller than a few rows, and not a divisor of any slice: block edges fall inside rank slices.
SMALL_BLOCK = 1000
SMALL_CHUNK = 4096


@dataclass(frozen=True)
class TinyModel:
    directory: Path
    config: dict[str, Any]
    original: dict[str, torch.Tensor]

    @property
    def headers(self) -> dict[str, SafetensorsHeader]:
        return {WEIGHTS: read_header(self.directory / WEIGHTS)}

    @property
    def sources(self) -> dict[str, Path]:
        return {WEIGHTS: self.directory / WEIGHTS}


MODELS: dict[str, dict[str, Any]] = {
    # A: GQA with 2 KV heads (so TP 4 and 8 replicate them), vocab 1001, tied embeddings.
    "A-llama-gqa-tied": {"num_kv_heads": 2, "vocab_size": 1001, "tie": True},
    # B: q/k/v/o biases, a separate lm_head, bf16.
    "B-llama-bias-untied-bf16": {
        "num_kv_heads": 4, "vocab_size": 1000, "tie": False, "bias": True, "dtype": torch.bfloat16
    },
    # C: Qwen2 (q/k/v biases, no o bias) with a single KV head, fp16.
    "C-qwen2-mqa-fp16": {
        "num_kv_heads": 1, "vocab_size": 999, "tie": False, "model_type": "qwen2",
        "dtype": torch.float16,
    },
    # D: Qwen3 (per-head q_norm/k_norm), full multi-head attention, tied, with biases.
    "D-qwen3-mha-tied": {
        "num_kv_heads": 8, "vocab_size": 1003, "tie": True, "bias": True, "model_type": "qwen3"
    },
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TinyModel]:
    built = {}
    for name, kwargs in MODELS.items():
        directory = make_tiny_llama(tmp_path_factory.mktemp(name), **kwargs)
        built[name] = TinyModel(
            directory=directory,
            config=json.loads((directory / "config.json").read_text()),
            original=load_file(str(directory / WEIGHTS)),
        )
    return built


@dataclass(frozen=True)
class Sharded:
    plan: ShardPlan
    files: list[RankShardFile]
    ranks: list[dict[str, torch.Tensor]]


@pytest.fixture(scope="module")
def sharded(
    models: dict[str, TinyModel], tmp_path_factory: pytest.TempPathFactory
) -> dict[tuple[str, int], Sharded]:
    out = {}
    for name, model in models.items():
        for tp in TP_SIZES:
            plan = plan_rank_shards(model.config, model.headers, tp)
            out_dir = tmp_path_factory.mktemp(f"{name}-tp{tp}")
            files = write_rank_shards(
                plan, model.sources, out_dir, chunk_size=SMALL_CHUNK, block_size=SMALL_BLOCK
            )
            # The safetensors package itself must accept every file.
            out[name, tp] = Sharded(plan, files, [load_file(str(f.path)) for f in files])
    return out


CASES = [(name, tp) for name in MODELS for tp in TP_SIZES]
CASE_IDS = [f"{name}-tp{tp}" for name, tp in CASES]


def _vllm_vocab_rows(vocab: int, tp: int) -> int:
    """Rows of each rank's vocab-parallel parameter in vLLM: V padded to 64, split evenly.

    Written from vLLM's ``pad_vocab_size`` and ``VocabParallelEmbedding`` (not from the code
    under test): ``Vp = ((V + 63) // 64) * 64``, ``Vp / tp`` rows per rank.
    """
    padded = ((vocab + 64 - 1) // 64) * 64
    assert padded % tp == 0
    return padded // tp


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.contiguous().view(torch.uint8)


def _assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.dtype == expected.dtype, what
    assert actual.shape == expected.shape, what
    assert torch.equal(_bits(actual), _bits(expected)), f"{what}: bytes differ"


def _geometry(config: dict[str, Any]) -> SimpleNamespace:
    heads = config["num_attention_heads"]
    return SimpleNamespace(
        hidden=config["hidden_size"],
        heads=heads,
        kv_heads=config["num_key_value_heads"],
        head_dim=config.get("head_dim") or config["hidden_size"] // heads,
        intermediate=config["intermediate_size"],
        layers=config["num_hidden_layers"],
        vocab=config["vocab_size"],
    )


# (a) ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "tp"), CASES, ids=CASE_IDS)
def test_rank_slices_rebuild_every_tensor_bit_for_bit(
    models: dict[str, TinyModel], sharded: dict[tuple[str, int], Sharded], name: str, tp: int
) -> None:
    model, ranks = models[name], sharded[name, tp].ranks
    g = _geometry(model.config)
    assert len(ranks) == tp
    for rank in ranks:
        assert rank.keys() == model.original.keys(), "rank files keep exactly the HF names"
    for tensor_name, original in model.original.items():
        pieces = [rank[tensor_name] for rank in ranks]
        what = f"{name} tp{tp} {tensor_name}"
        if tensor_name.endswith(("embed_tokens.weight", "lm_head.weight")):
            rows = _vllm_vocab_rows(original.shape[0], tp)
            assert all(piece.shape[0] == rows for piece in pieces), what
            for index, piece in enumerate(pieces):
                # rank r: rows [r*rows, (r+1)*rows) of the padded vocabulary, zeros past V
                start, stop = min(index * rows, original.shape[0]), min(
                    (index + 1) * rows, original.shape[0]
                )
                _assert_bitwise(piece[: stop - start], original[start:stop], what)
                assert not _bits(piece[stop - start :]).any(), f"{what}: padding is not zero"
            whole = torch.cat(pieces, dim=0)
            assert not _bits(whole[original.shape[0] :]).any(), f"{what}: padding is not zero"
            _assert_bitwise(whole[: original.shape[0]], original, what)
        elif any(f"self_attn.{p}_proj." in tensor_name for p in "kv"):
            if g.kv_heads % tp == 0:
                _assert_bitwise(torch.cat(pieces, dim=0), original, what)
            else:
                # N > nKV: rank r holds KV head r*nKV//N; keep one copy of each head.
                copies = tp // g.kv_heads
                for index, piece in enumerate(pieces):
                    head = index * g.kv_heads // tp
                    _assert_bitwise(
                        piece, original[head * g.head_dim : (head + 1) * g.head_dim], what
                    )
                _assert_bitwise(torch.cat(pieces[::copies], dim=0), original, what)
        elif "self_attn.q_proj." in tensor_name or any(
            f"mlp.{p}_proj." in tensor_name for p in ("gate", "up")
        ):
            _assert_bitwise(torch.cat(pieces, dim=0), original, what)
        elif tensor_name.endswith(("o_proj.weight", "down_proj.weight")):
            _assert_bitwise(torch.cat(pieces, dim=1), original, what)
        else:
            assert original.dim() == 1 or tensor_name.endswith("bias"), what
            for piece in pieces:
                _assert_bitwise(piece, original, what)


def test_tp1_and_unknown_architectures_write_nothing(
    models: dict[str, TinyModel], tmp_path: Path
) -> None:
    model = models["A-llama-gqa-tied"]
    plan = plan_rank_shards(model.config, model.headers, 1)
    assert (plan.mode, plan.family, plan.ranks) == ("full", "llama", ())
    assert write_rank_shards(plan, model.sources, tmp_path) == []

    gpt2 = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_head": 8}
    plan = plan_rank_shards(gpt2, model.headers, 4)
    assert (plan.mode, plan.family, plan.ranks) == ("full", None, ())
    assert "full-tensor mode" in plan.reason
    assert "GPT2LMHeadModel" in plan.reason
    assert write_rank_shards(plan, model.sources, tmp_path) == []

    quantized = {**model.config, "quantization_config": {"quant_method": "fp8"}}
    plan = plan_rank_shards(quantized, model.headers, 2)
    assert (plan.mode, plan.ranks) == ("full", ())
    assert "quantized" in plan.reason
    assert list(tmp_path.iterdir()) == []


# (b) ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def references(models: dict[str, TinyModel]) -> dict[str, PreTrainedModel]:
    return {
        name: AutoModelForCausalLM.from_pretrained(
            model.directory, dtype=torch.float32, attn_implementation="eager"
        ).eval()  # type: ignore[no-untyped-call]  # transformers leaves eval() unannotated
        for name, model in models.items()
    }


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _linear(x: torch.Tensor, shard: dict[str, torch.Tensor], prefix: str) -> torch.Tensor:
    bias = shard.get(f"{prefix}.bias")
    return torch.nn.functional.linear(x, shard[f"{prefix}.weight"].float(), bias=None) + (
        bias.float() if bias is not None else 0
    )


class _KvGroups(torch.nn.Module):
    """What ``eager_attention_forward`` reads of its attention module: the KV grouping (and
    ``training``, off: no dropout)."""

    def __init__(self, num_key_value_groups: int) -> None:
        super().__init__()
        self.num_key_value_groups = num_key_value_groups
        self.train(False)


def _attention_partial(
    x: torch.Tensor,
    shard: dict[str, torch.Tensor],
    prefix: str,
    *,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    head_dim: int,
    eps: float,
) -> torch.Tensor:
    """One rank's attention: its q heads against its KV heads, then its o_proj columns."""
    batch, seq, _ = x.shape
    q = _linear(x, shard, f"{prefix}.q_proj").view(batch, seq, -1, head_dim)
    k = _linear(x, shard, f"{prefix}.k_proj").view(batch, seq, -1, head_dim)
    v = _linear(x, shard, f"{prefix}.v_proj").view(batch, seq, -1, head_dim)
    if f"{prefix}.q_norm.weight" in shard:  # Qwen3 normalises each head before the rotation
        q = _rms_norm(q, shard[f"{prefix}.q_norm.weight"].float(), eps)
        k = _rms_norm(k, shard[f"{prefix}.k_norm.weight"].float(), eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    local_heads, local_kv_heads = q.shape[1], k.shape[1]
    module = _KvGroups(local_heads // local_kv_heads)
    out, _ = eager_attention_forward(module, q, k, v, mask, scaling=head_dim**-0.5, dropout=0.0)
    out = out.reshape(batch, seq, local_heads * head_dim)
    # Row-parallel o_proj: the rank's columns, no bias (added once after the sum).
    return torch.nn.functional.linear(out, shard[f"{prefix}.o_proj.weight"].float())


def _mlp_partial(
    x: torch.Tensor, shard: dict[str, torch.Tensor], prefix: str, act: Any
) -> torch.Tensor:
    hidden = act(_linear(x, shard, f"{prefix}.gate_proj")) * _linear(x, shard, f"{prefix}.up_proj")
    return torch.nn.functional.linear(hidden, shard[f"{prefix}.down_proj.weight"].float())


@pytest.mark.parametrize(("name", "tp"), CASES, ids=CASE_IDS)
def test_partial_forward_passes_sum_to_the_full_blocks(
    models: dict[str, TinyModel],
    sharded: dict[tuple[str, int], Sharded],
    references: dict[str, PreTrainedModel],
    name: str,
    tp: int,
) -> None:
    model, ranks, reference = models[name], sharded[name, tp].ranks, references[name]
    g = _geometry(model.config)
    eps = model.config["rms_norm_eps"]
    torch.manual_seed(1)
    seq = 7
    x = torch.randn(2, seq, g.hidden)
    position_ids = torch.arange(seq).unsqueeze(0).expand(2, -1)
    position_embeddings = reference.model.rotary_emb(x, position_ids)
    mask = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)[None, None]
    act = ACT2FN[model.config["hidden_act"]]
    for layer in range(g.layers):
        block = reference.model.layers[layer]
        prefix = f"model.layers.{layer}"
        with torch.no_grad():
            expected_attn, _ = block.self_attn(
                x, position_embeddings=position_embeddings, attention_mask=mask
            )
            expected_mlp = block.mlp(x)
            attn = sum(
                _attention_partial(
                    x,
                    shard,
                    f"{prefix}.self_attn",
                    position_embeddings=position_embeddings,
                    mask=mask,
                    head_dim=g.head_dim,
                    eps=eps,
                )
                for shard in ranks
            )
            mlp = sum(_mlp_partial(x, shard, f"{prefix}.mlp", act) for shard in ranks)
        o_bias = ranks[0].get(f"{prefix}.self_attn.o_proj.bias")
        if o_bias is not None:
            attn = attn + o_bias.float()
        # Summing partials reorders fp32 additions, so rounding scales with the block's output
        # magnitude, not with an element that happens to cancel near zero: atol follows it.
        for actual, expected in ((attn, expected_attn), (mlp, expected_mlp)):
            scale = float(expected.abs().max())
            torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


# (d) ------------------------------------------------------------------------------------------


def _expected_rank_bytes(config: dict[str, Any], tp: int, *, item: int) -> int:
    """A rank's data bytes from config.json alone: 1/N of each split tensor, plus the rest."""
    g = _geometry(config)
    attention_bias = config.get("attention_bias") or config["model_type"] == "qwen2"
    o_bias = bool(config.get("attention_bias"))
    kv_heads_per_rank = g.kv_heads // tp if g.kv_heads % tp == 0 else 1
    vocab_tensors = 1 if config["tie_word_embeddings"] else 2
    elements = vocab_tensors * _vllm_vocab_rows(g.vocab, tp) * g.hidden
    per_layer = (
        g.heads * g.head_dim * g.hidden // tp  # q_proj
        + 2 * kv_heads_per_rank * g.head_dim * g.hidden  # k_proj, v_proj
        + g.hidden * g.heads * g.head_dim // tp  # o_proj
        + 3 * g.intermediate * g.hidden // tp  # gate, up, down
        + 2 * g.hidden  # the two norms, replicated
    )
    if attention_bias:
        per_layer += g.heads * g.head_dim // tp + 2 * kv_heads_per_rank * g.head_dim
    if o_bias:
        per_layer += g.hidden  # replicated: added once after the reduce
    if config["model_type"] == "qwen3":
        per_layer += 2 * g.head_dim  # q_norm, k_norm, replicated
    elements += g.layers * per_layer + g.hidden  # final norm
    return int(elements * item)


@pytest.mark.parametrize(("name", "tp"), CASES, ids=CASE_IDS)
def test_each_rank_holds_exactly_its_share_of_the_bytes(
    models: dict[str, TinyModel], sharded: dict[tuple[str, int], Sharded], name: str, tp: int
) -> None:
    model, result = models[name], sharded[name, tp]
    item = next(iter(model.original.values())).element_size()
    expected = _expected_rank_bytes(model.config, tp, item=item)
    for rank, written in enumerate(result.files):
        header = read_header(written.path)
        assert header.data_size == expected, f"rank {rank}"
        assert result.plan.ranks[rank].nbytes == expected
        assert written.size == header.file_size == written.path.stat().st_size
    if tp <= _geometry(model.config).kv_heads:
        # Without replicated KV heads, the split bytes across all ranks add up to the model's
        # split bytes plus vocab padding, so the ranks together hold one copy and no more.
        replicated = sum(
            t.numel() * item
            for n, t in model.original.items()
            if t.dim() == 1 and not n.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias"))
        )
        total = sum(t.numel() for t in model.original.values()) * item
        vocab_tensors = 1 if model.config["tie_word_embeddings"] else 2
        vocab = model.config["vocab_size"]
        padding = (
            vocab_tensors
            * (_vllm_vocab_rows(vocab, tp) * tp - vocab)
            * model.config["hidden_size"]
            * item
        )
        assert tp * expected == total - replicated + tp * replicated + padding


# the written files ------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "tp"), [("B-llama-bias-untied-bf16", 4), ("A-llama-gqa-tied", 8)])
def test_written_files_match_their_tables_and_digests(
    models: dict[str, TinyModel],
    sharded: dict[tuple[str, int], Sharded],
    tmp_path: Path,
    name: str,
    tp: int,
) -> None:
    model, result = models[name], sharded[name, tp]
    for rank, written in enumerate(result.files):
        data = written.path.read_bytes()
        assert written.rank == rank
        assert written.tp_size == tp
        assert written.sha256 == hashlib.sha256(data).hexdigest()
        assert written.chunk_size == SMALL_CHUNK
        chunks = [data[i : i + SMALL_CHUNK] for i in range(0, len(data), SMALL_CHUNK)]
        assert len(chunks) > 1
        assert list(written.chunk_xxh3_128) == [xxhash.xxh3_128_hexdigest(c) for c in chunks]
        header = read_header(written.path)
        by_name = header.by_name()
        assert [e.name for e in written.tensors] == [t.name for t in header.tensors]
        for entry in written.tensors:
            info = by_name[entry.name]
            assert (entry.dtype, entry.shape) == (info.dtype, info.shape)
            assert (entry.offset, entry.length) == (header.data_offset + info.start, info.nbytes)
            tensor = result.ranks[rank][entry.name]
            stored = data[entry.offset : entry.offset + entry.length]
            assert stored == _bits(tensor).numpy().tobytes()
            # Larger dtypes first and an 8-aligned data section: tensors are naturally aligned.
            assert entry.offset % tensor.element_size() == 0
        with safe_open(str(written.path), "pt") as handle:
            metadata = handle.metadata()
        assert metadata["weightcache.tp_size"] == str(tp)
        assert metadata["weightcache.rank"] == str(rank)
        assert metadata["weightcache.vocab_size"] == str(model.config["vocab_size"])
        assert metadata["weightcache.layout"] == "vllm-vocab-pad64"
        assert metadata["weightcache.vocab_padding"] == "64"
        assert metadata["weightcache.vocab_padded"] == str(
            _vllm_vocab_rows(model.config["vocab_size"], 1)
        )
    # The block size only changes how the source is read, never a byte of the output.
    plan = plan_rank_shards(model.config, model.headers, tp)
    again = write_rank_shards(plan, model.sources, tmp_path, chunk_size=SMALL_CHUNK)
    assert [f.sha256 for f in again] == [f.sha256 for f in result.files]
    assert len({f.path for f in again} | {f.path for f in result.files}) == 2 * tp


def test_several_source_files_and_unrecognised_tensors(
    models: dict[str, TinyModel], tmp_path: Path
) -> None:
    model = models["B-llama-bias-untied-bf16"]
    names = sorted(model.original)
    extra = {
        "model.vision_proj.weight": torch.randn(3, 5).to(torch.bfloat16),
        "model.rotary_emb.inv_freq": torch.randn(4),
    }
    parts = {
        "model-00001-of-00002.safetensors": {n: model.original[n] for n in names[::2]} | extra,
        "model-00002-of-00002.safetensors": {n: model.original[n] for n in names[1::2]},
    }
    for file, tensors in parts.items():
        save_file(tensors, str(tmp_path / file), metadata={"format": "pt"})
    headers = {file: read_header(tmp_path / file) for file in parts}
    plan = plan_rank_shards(model.config, headers, 2)
    assert plan.replicated_unrecognised == ("model.vision_proj.weight",)
    out = tmp_path / "out"
    out.mkdir()
    files = write_rank_shards(plan, {file: tmp_path / file for file in parts}, out)
    original = model.original | extra
    for written in files:
        rank = load_file(str(written.path))
        assert rank.keys() == original.keys()
        for n in extra:
            _assert_bitwise(rank[n], extra[n], n)
    q = "model.layers.1.self_attn.q_proj.weight"
    rebuilt = torch.cat([load_file(str(f.path))[q] for f in files])
    _assert_bitwise(rebuilt, original[q], q)


# families and failures ----------------------------------------------------------------------


def test_detect_family(models: dict[str, TinyModel], tmp_path: Path) -> None:
    for model in models.values():
        assert detect_family(model.config) == "llama"
    mistral = make_tiny_llama(tmp_path / "mistral", model_type="mistral")
    assert detect_family(json.loads((mistral / "config.json").read_text())) == "llama"
    assert detect_family({"model_type": "llama"}) == "llama"
    assert detect_family({"architectures": ["Qwen2ForCausalLM"]}) == "llama"
    for other in (
        {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]},
        {"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"]},
        {"model_type": "llama", "architectures": ["LlavaLlamaForCausalLM"]},
        {"model_type": "gpt2"},
        {},
    ):
        assert detect_family(other) is None, other


def test_divisibility_and_shape_failures_raise_clear_errors(models: dict[str, TinyModel]) -> None:
    model = models["A-llama-gqa-tied"]
    with pytest.raises(ShardingUnsupported, match="num_attention_heads 8 is not divisible by 3"):
        plan_rank_shards(model.config, model.headers, 3)
    bad_mlp = {**model.config, "intermediate_size": 130}
    with pytest.raises(ShardingUnsupported, match="intermediate_size 130 is not divisible by 4"):
        plan_rank_shards(bad_mlp, model.headers, 4)
    bad_kv = {**model.config, "num_attention_heads": 6, "num_key_value_heads": 3}
    with pytest.raises(ShardingUnsupported, match="num_key_value_heads 3 and tp_size 2"):
        plan_rank_shards(bad_kv, model.headers, 2)
    lying = {**model.config, "num_attention_heads": 4}  # head_dim stays 8: 32-wide projections
    with pytest.raises(
        ShardingUnsupported, match=r"proj.weight' has shape \[64, 64\], config.json implies"
    ):
        plan_rank_shards(lying, model.headers, 2)
    with pytest.raises(InvalidInput):
        plan_rank_shards(model.config, model.headers, 0)
    assert issubclass(ShardingUnsupported, ValueError)


def test_write_failures_leave_nothing_behind(models: dict[str, TinyModel], tmp_path: Path) -> None:
    model = models["A-llama-gqa-tied"]
    plan = plan_rank_shards(model.config, model.headers, 2)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InvalidInput, match="no path given"):
        write_rank_shards(plan, {}, out)
    truncated = tmp_path / WEIGHTS
    shutil.copyfile(model.directory / WEIGHTS, truncated)
    with truncated.open("r+b") as handle:
        handle.truncate(truncated.stat().st_size - 100)
    with pytest.raises(IntegrityError, match="source file ends"):
        write_rank_shards(plan, {WEIGHTS: truncated}, out)
    assert list(out.iterdir()) == []


# the engine's vocab layout ---------------------------------------------------------------------


def _vocab_only_model(vocab: int, hidden: int = 8) -> tuple[dict[str, Any], dict[str, Any]]:
    """config.json and a parsed header of a one-norm Llama with untied vocab tensors (no bytes)."""
    from loader.safetensors_format import encode_header, parse_header

    config = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "intermediate_size": 16,
        "vocab_size": vocab,
    }
    entries = [
        ("model.embed_tokens.weight", "BF16", (vocab, hidden), vocab * hidden * 2),
        ("lm_head.weight", "BF16", (vocab, hidden), vocab * hidden * 2),
        ("model.norm.weight", "BF16", (hidden,), hidden * 2),
    ]
    header, _ = encode_header(entries)
    total = len(header) + sum(e[3] for e in entries)
    return config, {WEIGHTS: parse_header(header, file_size=total)}


@pytest.mark.parametrize("vocab", [1001, 32001, 128257, 1024])
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_vocab_rows_follow_vllms_padding_and_split(vocab: int, tp: int) -> None:
    from cache_node.sharding import padded_vocab_size, vocab_rows

    config, headers = _vocab_only_model(vocab)
    per_rank = _vllm_vocab_rows(vocab, tp)
    # vLLM's VocabParallelEmbedding: rank r owns [r*per, (r+1)*per) of the padded vocabulary,
    # loads the part below V and zero-fills the rest of its per-rank rows.
    expected = [
        (min(r * per_rank, vocab), min((r + 1) * per_rank, vocab)) for r in range(tp)
    ]
    assert padded_vocab_size(vocab) == per_rank * tp
    assert [vocab_rows(vocab, tp, r)[:2] for r in range(tp)] == expected
    plan = plan_rank_shards(config, headers, tp)
    if tp == 1:
        assert plan.mode == "full"  # the engine pads the unsplit tensor itself
        return
    assert plan.vocab_size == vocab
    assert plan.vocab_padded == per_rank * tp
    covered: list[int] = []
    for rank_plan, (start, stop) in zip(plan.ranks, expected, strict=True):
        assert rank_plan.metadata["weightcache.layout"] == "vllm-vocab-pad64"
        assert rank_plan.metadata["weightcache.vocab_padded"] == str(per_rank * tp)
        for piece in rank_plan.tensors:
            if piece.rule != "vocab":
                continue
            assert piece.shape == (per_rank, 8), "exactly the shape of vLLM's parameter"
            assert (piece.start, piece.stop) == (start, stop)
            assert piece.pad_rows == per_rank - (stop - start)
            if piece.name == "lm_head.weight":
                covered.extend(range(piece.start, piece.stop))
    assert covered == list(range(vocab)), "every token row once, in order"


def test_vocab_that_does_not_split_evenly_is_refused() -> None:
    from cache_node.sharding import vocab_rows

    # vLLM asserts tp divides the padded vocabulary; the sharder refuses the same cases.
    with pytest.raises(ShardingUnsupported, match="does not split evenly over tp_size 3"):
        vocab_rows(1001, 3, 0)
    config, headers = _vocab_only_model(1001)
    with pytest.raises(ShardingUnsupported, match="vocab_size 1000"):
        plan_rank_shards({**config, "vocab_size": 1000}, headers, 2)
