"""The CUDA path on a real GPU: ``make test-gpu`` on a GPU host (deselected elsewhere).

CI has no GPU; the same code runs there on the CPU (the ring sink's CPU mode). Selected
explicitly on a machine without CUDA, these tests fail rather than pretend to pass.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loader.loading import load, load_all_ranks
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA device: run them on a GPU host (make test-gpu)")
    return torch.device("cuda:0")


def test_load_into_the_gpu_equals_the_checkpoint(tmp_path: Path, cuda: torch.device) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=2, dtype=torch.bfloat16, tie=False)
    original = load_file(str(source / "model.safetensors"))
    with running_node(data_dir=tmp_path / "data") as node, node.client() as c:
        body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [1, 2]}
        c.put("/v1/pipelines/tiny", json=body)
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        for local_dir in (None, tmp_path / "data"):
            result = load("tiny", url=node.url, device=cuda, verify=True, local_dir=local_dir)
            for name, tensor in original.items():
                loaded = result.tensors[name]
                assert loaded.device.type == "cuda"
                assert torch.equal(loaded.cpu(), tensor), name
        both = load_all_ranks("tiny", tp_size=2, devices=["cuda:0", "cuda:0"], url=node.url)
        for name, tensor in original.items():
            parts = [rank.tensors[name].cpu() for rank in both.ranks]
            if name.endswith(("q_proj.weight", "gate_proj.weight", "up_proj.weight")):
                assert torch.equal(torch.cat(parts), tensor), name
