"""A tiny Llama through a real node: per-rank shards, manifests, and what ``load`` returns."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from loader.load import load
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama

_ROWS = ("q_proj.weight", "k_proj.weight", "v_proj.weight", "gate_proj.weight", "up_proj.weight")
_COLUMNS = ("o_proj.weight", "down_proj.weight")


def test_sharded_pipeline_loads_rank_slices_that_rebuild_the_model(tmp_path: Path) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=4, vocab_size=1000, tie=False)
    original = load_file(str(source / "model.safetensors"))
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [1, 2, 4]}
        assert c.put("/v1/pipelines/tiny", json=body).status_code == 202
        status = wait_for_state(c, "tiny", {"warm", "failed"})
        assert status["state"] == "warm", status
        assert status["shards"] == {"1": "ready", "2": "ready", "4": "ready"}

        whole = load("tiny", url=node.url).tensors
        assert set(whole) == set(original)
        for name, tensor in original.items():
            assert torch.equal(whole[name], tensor), name

        for tp_size in (2, 4):
            ranks = [
                load("tiny", tp_size=tp_size, rank=r, url=node.url, verify=True).tensors
                for r in range(tp_size)
            ]
            for name, tensor in original.items():
                parts = [rank[name] for rank in ranks]
                if name.endswith(_ROWS):
                    rebuilt = torch.cat(parts, dim=0)
                elif name.endswith(_COLUMNS):
                    rebuilt = torch.cat(parts, dim=1)
                elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                    rebuilt = torch.cat(parts, dim=0)[: tensor.shape[0]]
                else:
                    assert all(torch.equal(p, tensor) for p in parts), name
                    continue
                assert torch.equal(rebuilt, tensor), (tp_size, name)
            split = sum(
                t.numel() * t.element_size() for n, t in original.items() if t.dim() == 2
            )
            received = sum(
                t.numel() * t.element_size() for t in ranks[0].values() if t.dim() == 2
            )
            assert received == split // tp_size  # 1/N of the split bytes (1000 % 4 == 0)
