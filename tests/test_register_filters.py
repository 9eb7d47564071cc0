"""``weightcache register --include/--exclude/--revision``, as people use ``hf download``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from clients.cli import main
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state


def test_include_exclude_and_revision(
    tmp_path: Path, hf_hub: FixtureHub, capsys: pytest.CaptureFixture[str]
) -> None:
    first = {
        "config.json": b'{"v": 1}',
        "tokenizer.json": b'{"t": 1}',
        "model.safetensors": save({"w": torch.zeros(4)}),
        "README.md": b"old",
    }
    old = hf_hub.add_repo("org/filters", first, branch="release")
    hf_hub.add_repo("org/filters", {**first, "config.json": b'{"v": 2}'})  # main moves on
    settings = {"data_dir": tmp_path / "data", "hf": {"endpoint": hf_hub.endpoint}}
    with running_node(**settings) as node, node.client() as client:
        code = main(["--url", node.url, "register", "p", "--model", "llm=hf://org/filters",
                     "--revision", "release", "--include", "*.json", "--include",
                     "*.safetensors", "--include", "*.md", "--exclude", "tokenizer*",
                     "--exclude", "README.md"])
        assert code == 0
        capsys.readouterr()
        status = wait_for_state(client, "p", {"warm", "failed"})
        assert status["state"] == "warm", status
        files = {f["path"] for f in client.get("/v1/pipelines/p/files").json()["files"]}
        assert files == {"config.json", "model.safetensors"}
        assert status["models"][0]["revision"] == old
        assert hf_hub.requests("tokenizer.json") == 0
        assert hf_hub.requests("README.md") == 0


def test_exclude_is_part_of_the_wire_spec(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({"a": 1}))
    (source / "notes.md").write_text("skip me")
    (source / "model.safetensors").write_bytes(save({"w": torch.zeros(4)}))
    with running_node(data_dir=tmp_path / "data", local_roots=[tmp_path]) as node, \
            node.client() as client:
        body = {"models": [{"name": "m", "source": f"file://{source}", "exclude": ["*.md"]}]}
        assert client.put("/v1/pipelines/q", json=body).status_code == 202
        status = wait_for_state(client, "q", {"warm", "failed"})
        assert status["state"] == "warm", status
        assert status["models"][0]["files"] == 2
