"""Rank shards placed into vLLM-shaped (fused) parameters, checked against independent slicing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cache_node import sharding
from loader.safetensors_format import read_header
from loader.vllm_plugin import parse_extra_config
from loader.vllm_weights import WeightMismatch, copy_rank_weights, vllm_target
from tests.fixtures.tiny_llama import make_tiny_llama


def _rank_tensors(source: Path, tp_size: int, out: Path) -> list[dict[str, torch.Tensor]]:
    config = json.loads((source / "config.json").read_text())
    path = source / "model.safetensors"
    plan = sharding.plan_rank_shards(config, {"model.safetensors": read_header(path)}, tp_size)
    out.mkdir(exist_ok=True)
    files = sorted(
        sharding.write_rank_shards(plan, {"model.safetensors": path}, out), key=lambda f: f.rank
    )
    return [load_file(str(f.path)) for f in files]


def _expected_params(
    original: dict[str, torch.Tensor], config: dict[str, int], tp_size: int, rank: int
) -> dict[str, torch.Tensor]:
    """What vLLM holds on ``rank``, sliced straight from the full tensors."""
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config["hidden_size"] // heads
    inter = config["intermediate_size"] // tp_size
    q_rows = heads // tp_size * head_dim
    kv_index = rank * kv_heads // tp_size if tp_size > kv_heads else None
    kv_rows = (kv_heads // tp_size if kv_index is None else 1) * head_dim
    kv_start = (rank * kv_rows) if kv_index is None else kv_index * head_dim
    vocab = original["model.embed_tokens.weight"].shape[0]
    padded = -(-vocab // 64) * 64  # vLLM pads the vocabulary to a multiple of 64
    per_rank_vocab = padded // tp_size
    params: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for name, tensor in original.items():
        target, part, index = vllm_target(name)
        if part == "q_proj":
            piece = tensor[rank * q_rows : (rank + 1) * q_rows]
        elif part in ("k_proj", "v_proj"):
            piece = tensor[kv_start : kv_start + kv_rows]
        elif part in ("gate_proj", "up_proj"):
            piece = tensor[rank * inter : (rank + 1) * inter]
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            cols = tensor.shape[1] // tp_size
            params[target] = tensor[:, rank * cols : (rank + 1) * cols]
            continue
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            full = torch.zeros(padded, tensor.shape[1], dtype=tensor.dtype)
            full[:vocab] = tensor
            params[target] = full[rank * per_rank_vocab : (rank + 1) * per_rank_vocab]
            continue
        else:
            params[target] = tensor
            continue
        stacked.setdefault(target, {})[index] = piece
    for target, pieces in stacked.items():
        params[target] = torch.cat([pieces[i] for i in sorted(pieces)])
    return params


@pytest.mark.parametrize(
    ("tp_size", "kv_heads", "vocab"), [(2, 2, 1024), (4, 2, 1001), (2, 4, 1001), (8, 2, 1001)]
)
def test_rank_shards_fill_fused_vllm_parameters(
    tmp_path: Path, tp_size: int, kv_heads: int, vocab: int
) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=kv_heads, vocab_size=vocab, tie=False)
    config = json.loads((source / "config.json").read_text())
    original = load_file(str(source / "model.safetensors"))
    for rank, tensors in enumerate(_rank_tensors(source, tp_size, tmp_path / "shards")):
        expected = _expected_params(original, config, tp_size, rank)
        params = {name: torch.full_like(t, float("nan")) for name, t in expected.items()}
        filled = copy_rank_weights(params, tensors.items())
        assert filled == set(expected)
        for name, tensor in expected.items():
            assert torch.equal(params[name], tensor), (tp_size, rank, name)


def test_shapes_that_do_not_fit_are_refused() -> None:
    qkv = "model.layers.0.self_attn.qkv_proj.weight"
    params = {qkv: torch.zeros(6, 4), "model.embed_tokens.weight": torch.zeros(64, 4)}
    with pytest.raises(WeightMismatch, match=r"\[6, 4\].*missing") as caught:
        copy_rank_weights(params, [("model.layers.0.self_attn.q_proj.weight", torch.ones(2, 4))])
    assert caught.value.code == "fused_rows"
    with pytest.raises(WeightMismatch, match="no parameter") as caught:
        copy_rank_weights(params, [("model.norm.weight", torch.ones(4))])
    assert caught.value.code == "no_parameter"
    # A vocab shard cut by another rule (ceil(1001/2) = 501 rows, not vLLM's 512): refused with
    # both shapes, never zero-filled at the end nor truncated.
    for rows in (501, 60):
        with pytest.raises(WeightMismatch, match=rf"\[{rows}, 4\].*\[64, 4\]") as caught:
            copy_rank_weights(params, [("model.embed_tokens.weight", torch.ones(rows, 4))])
        assert caught.value.code == "shape_mismatch"
        assert not params["model.embed_tokens.weight"].any(), "nothing was copied"
    too_many = [
        (f"model.layers.0.self_attn.{p}_proj.weight", torch.ones(3, 4)) for p in "qkv"
    ]
    with pytest.raises(WeightMismatch, match="do not fill") as caught:
        copy_rank_weights(params, too_many)
    assert caught.value.code == "fused_rows"


class _TinyVllmLike(torch.nn.Module):
    """A vLLM-shaped module tree: fused projections, a tied lm_head, a rotary buffer."""

    def __init__(self, *, tie: bool) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.embed_tokens = torch.nn.Embedding(64, 4)
        self.model.norm = torch.nn.LayerNorm(4, bias=False)
        self.model.register_buffer("cos_sin_cache", torch.ones(3))
        self.lm_head = torch.nn.Module()
        self.lm_head.weight = (
            self.model.embed_tokens.weight if tie else torch.nn.Parameter(torch.zeros(64, 4))
        )


def test_every_parameter_must_be_filled_except_what_vllm_skips() -> None:
    from loader.vllm_weights import check_all_filled, model_parameters

    tied = _TinyVllmLike(tie=True)
    params, aliases = model_parameters(tied)
    assert set(params) == {"model.embed_tokens.weight", "model.norm.weight"}
    assert aliases == {"lm_head.weight": "model.embed_tokens.weight"}
    shard = [
        ("model.embed_tokens.weight", torch.ones(64, 4)),
        ("model.norm.weight", torch.full((4,), 2.0)),
        # a tied checkpoint that still carries lm_head, and an old rotary cache: vLLM skips both
        ("lm_head.weight", torch.full((64, 4), 7.0)),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(2)),
    ]
    filled = copy_rank_weights(params, shard, aliases=aliases)
    check_all_filled(tied, filled)
    assert torch.equal(tied.get_parameter("lm_head.weight"), torch.ones(64, 4)), (
        "the alias was not written"
    )
    untied = _TinyVllmLike(tie=False)
    params, aliases = model_parameters(untied)
    filled = copy_rank_weights(params, shard[:2], aliases=aliases)
    with pytest.raises(WeightMismatch, match=r"lm_head\.weight") as caught:
        check_all_filled(untied, filled)
    assert caught.value.code == "unfilled"


def test_extra_config_is_validated() -> None:
    assert parse_extra_config({"pipeline": "chat"}) == {"pipeline": "chat"}
    with pytest.raises(ValueError, match="unknown"):
        parse_extra_config({"pipeline": "chat", "shard": 1})
    with pytest.raises(ValueError, match="needs"):
        parse_extra_config({})


def test_the_plugin_places_the_layout_the_node_cuts() -> None:
    from cache_node.sharding import SHARD_LAYOUT
    from loader.vllm_weights import ENGINE_LAYOUT, check_layout

    assert ENGINE_LAYOUT == SHARD_LAYOUT
    check_layout(SHARD_LAYOUT)
    check_layout(None)  # a node that does not say: the shapes are still checked one by one
    with pytest.raises(WeightMismatch, match="vllm-vocab-pad128") as caught:
        check_layout("vllm-vocab-pad128")
    assert caught.value.code == "layout"
