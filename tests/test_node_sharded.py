"""A tiny Llama through a real node: per-rank shards, manifests, and what ``load`` returns."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from loader.loading import load
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
            # 1/N of the split bytes, plus each vocab tensor's share of vLLM's padding (the
            # vocabulary of 1000 is padded to 1024 rows, then split evenly)
            pad = 2 * (1024 - 1000) * original["lm_head.weight"][0].numel() * 4
            assert received == (split + pad) // tp_size


def test_shards_cut_by_another_layout_are_rebuilt_not_served(tmp_path: Path) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=2, vocab_size=1001, tie=False)
    body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [2]}
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        assert c.put("/v1/pipelines/tiny", json=body).status_code == 202
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        manifest = c.get("/v1/pipelines/tiny/manifest", params={"tp_size": 2, "rank": 1}).json()
        assert manifest["layout"] == "vllm-vocab-pad64"
        embed = next(t for t in manifest["tensors"] if t["name"] == "model.embed_tokens.weight")
        assert embed["shape"] == [512, 64]  # 1001 padded to 1024, halved
        # A record from before layouts were recorded (the old ceil(V/N) split).
        record = next(iter(node.node.registry.all()))
        assert record.shards["2"].layout == "vllm-vocab-pad64"
        assert record.shards["2"].vocab_sizes == {"llm": 1001}
        assert record.shards["2"].vocab_padding == 64
        record.shards["2"].layout = None
        node.node.registry.put(record)
        refused = c.get("/v1/pipelines/tiny/manifest", params={"tp_size": 2, "rank": 1})
        assert refused.status_code == 409
        assert "layout" in refused.json()["error"]["message"]
    # A restart finds the stale set, and the re-warm cuts it again in the current layout.
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        manifest = c.get("/v1/pipelines/tiny/manifest", params={"tp_size": 2, "rank": 1}).json()
        assert manifest["layout"] == "vllm-vocab-pad64"
