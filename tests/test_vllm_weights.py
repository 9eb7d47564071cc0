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


@pytest.mark.parametrize(("tp_size", "kv_heads"), [(2, 2), (4, 2), (2, 4)])
def test_rank_shards_fill_fused_vllm_parameters(
    tmp_path: Path, tp_size: int, kv_heads: int
) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=kv_heads, vocab_size=1024, tie=False)
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
    params = {"model.layers.0.self_attn.qkv_proj.weight": torch.zeros(6, 4)}
    with pytest.raises(WeightMismatch, match="parts fill"):
        copy_rank_weights(params, [("model.layers.0.self_attn.q_proj.weight", torch.ones(2, 4))])
    with pytest.raises(WeightMismatch, match="no parameter"):
        copy_rank_weights(params, [("model.norm.weight", torch.ones(4))])


def test_extra_config_is_validated() -> None:
    assert parse_extra_config({"pipeline": "chat"}) == {"pipeline": "chat"}
    with pytest.raises(ValueError, match="unknown"):
        parse_extra_config({"pipeline": "chat", "shard": 1})
    with pytest.raises(ValueError, match="needs"):
        parse_extra_config({})
