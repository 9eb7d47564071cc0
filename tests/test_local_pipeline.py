"""A pipeline from a local directory, end to end through a real node."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from tests.fixtures.node_server import running_node, wait_for_state


def _make_model(directory: Path) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True)
    tensors = {
        "model.embed_tokens.weight": torch.randn(64, 32),
        "model.norm.weight": torch.randn(32),
    }
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "llama"}')
    (directory / "pytorch_model.bin").write_bytes(os.urandom(100))
    return tensors


def test_local_pipeline_warms_and_serves_verified_bytes(tmp_path: Path) -> None:
    tensors = _make_model(tmp_path / "src")
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        answer = c.put(
            "/v1/pipelines/tiny",
            json={"models": [{"name": "llm", "source": f"file://{tmp_path / 'src'}"}]},
        )
        assert answer.status_code == 202, answer.text
        status = wait_for_state(c, "tiny", {"warm", "failed"})
        assert status["state"] == "warm", status
        assert status["models"][0]["files"] == 2  # the .bin duplicate is skipped
        assert status["bytes_cached"] == status["bytes_total"] > 0
        again = c.put(
            "/v1/pipelines/tiny",
            json={"models": [{"name": "llm", "source": f"file://{tmp_path / 'src'}"}]},
        )
        assert again.status_code == 200
        manifest = c.get("/v1/pipelines/tiny/manifest", params={"tp_size": 1, "rank": 0}).json()
        assert {t["name"] for t in manifest["tensors"]} == set(tensors)
        blob = manifest["tensors"][0]["blob"]
        whole = c.get(f"/v1/blobs/{blob}")
        assert whole.status_code == 200
        out = tmp_path / "copy.safetensors"
        out.write_bytes(whole.content)
        loaded = load_file(str(out))
        for name, tensor in tensors.items():
            assert torch.equal(loaded[name], tensor)
        part = c.get(f"/v1/blobs/{blob}", headers={"Range": "bytes=8-15"})
        assert part.status_code == 206
        assert part.content == whole.content[8:16]
        assert part.headers["content-range"] == f"bytes 8-15/{len(whole.content)}"
        assert c.get(f"/v1/blobs/{blob}", headers={"Range": "bytes=999999-"}).status_code == 416
