"""Direct loading on a real GPU: ``make test-gpu`` on a GPU host (deselected elsewhere).

The bound of the CPU test (``test_param_sink``), measured with the CUDA allocator: streaming a
rank into parameters already on the GPU allocates next to nothing there (the staging ring is
pinned host memory), where loading into a fresh allocation and copying needs the weights twice.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loader.manifest_stream import load_manifest, stream_into
from loader.sources import LocalFileSource
from loader.vllm_plugin import load_rank_into
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.param_memory import row_values
from tests.fixtures.tiny_llama import make_tiny_llama
from tests.test_param_sink import COLUMNS, ROWS, _write_blob
from tests.test_vllm_direct import VllmShaped
from tests.test_vllm_weights import _expected_params

pytestmark = pytest.mark.gpu


@pytest.fixture
def cuda() -> torch.device:
    if not torch.cuda.is_available():
        pytest.fail("these tests need a CUDA device: run them on a GPU host (make test-gpu)")
    return torch.device("cuda:0")


@pytest.mark.parametrize("checkpoint", [torch.float32, torch.bfloat16])
def test_direct_load_on_the_gpu_allocates_no_second_copy(
    tmp_path: Path, cuda: torch.device, checkpoint: torch.dtype
) -> None:
    manifest = _write_blob(tmp_path / "data", checkpoint)
    params = {
        t.name: torch.zeros(t.shape, dtype=torch.float32, device=cuda) for t in manifest.tensors
    }
    weights = sum(p.numel() * p.element_size() for p in params.values())
    request_size = 8 << 20
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(cuda)
    before = torch.cuda.memory_allocated(cuda)
    stream_into(
        manifest, params, source=LocalFileSource(tmp_path / "data"), device=cuda,
        request_size=request_size,
    )
    torch.cuda.synchronize()
    growth = torch.cuda.max_memory_allocated(cuda) - before
    print(f"direct {checkpoint}: peak device growth {growth} bytes for {weights} of weights")
    # a cast may stage one request on the device; never the weights
    assert growth <= 2 * request_size + (1 << 20), growth
    for index, param in enumerate(params.values()):
        expected = row_values(COLUMNS, index).to(cuda)
        assert torch.equal(param[0], expected)
        assert torch.equal(param[ROWS - 1], expected)
    if checkpoint == torch.float32:
        torch.cuda.reset_peak_memory_stats(cuda)
        before = torch.cuda.memory_allocated(cuda)
        tensors, _ = load_manifest(
            manifest, source=LocalFileSource(tmp_path / "data"), device=cuda
        )
        for name, tensor in tensors.items():
            params[name].copy_(tensor)
        del tensors
        torch.cuda.synchronize()
        flat = torch.cuda.max_memory_allocated(cuda) - before
        print(f"flat then copy: peak device growth {flat} bytes")
        assert flat >= weights


def test_plugin_fills_vllm_shaped_parameters_on_the_gpu(
    tmp_path: Path, cuda: torch.device
) -> None:
    source = make_tiny_llama(
        tmp_path / "src", num_kv_heads=2, vocab_size=1001, tie=False, dtype=torch.bfloat16
    )
    config = json.loads((source / "config.json").read_text())
    original = load_file(str(source / "model.safetensors"))
    with running_node(data_dir=tmp_path / "data") as node, node.client() as c:
        body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [2]}
        c.put("/v1/pipelines/tiny", json=body)
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        for engine in (torch.bfloat16, torch.float32):
            for rank in range(2):
                expected = _expected_params(original, config, 2, rank)
                model = VllmShaped({n: t.shape for n, t in expected.items()}, engine).to(cuda)
                options = {"pipeline": "tiny", "url": node.url, "verify": True}
                load_rank_into(model, options, tp_size=2, rank=rank)
                params = dict(model.named_parameters())
                for name, tensor in expected.items():
                    assert params[name].device.type == "cuda"
                    assert torch.equal(params[name].cpu(), tensor.to(engine)), (rank, name)
