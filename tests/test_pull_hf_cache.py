"""``weightcache pull --hf-cache``: transformers loads the pulled model offline, as from the hub."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from clients.cli import main
from clients.hf_cache import default_hf_cache, repo_folder, repo_id_of
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama

ROOT = Path(__file__).parents[1]

_LOAD_OFFLINE = """
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("org/tiny", cache_dir=sys.argv[1])
ids = torch.tensor([[1, 2, 3]])
torch.save(model(ids).logits, sys.argv[2])
"""


def _logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    with torch.no_grad():
        logits: torch.Tensor = model(torch.tensor([[1, 2, 3]])).logits
    return logits


def test_pulled_model_loads_offline_with_transformers(
    tmp_path: Path, hf_hub: FixtureHub, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_tiny_llama(tmp_path / "src", vocab_size=1001)
    hf_hub.add_repo("org/tiny", {p.name: p.read_bytes() for p in source.iterdir()})
    settings = {"data_dir": tmp_path / "data", "hf": {"endpoint": hf_hub.endpoint}}
    with running_node(**settings) as node, node.client() as client:
        body = {"models": [{"name": "llm", "source": "hf://org/tiny"}]}
        assert client.put("/v1/pipelines/chat", json=body).status_code == 202
        status = wait_for_state(client, "chat", {"warm", "failed"})
        assert status["state"] == "warm", status
        commit = status["models"][0]["revision"]
        cache = tmp_path / "hub-cache"

        assert main(["--url", node.url, "pull", "chat", "--hf-cache", str(cache)]) == 0
        out = capsys.readouterr()
        assert "0 already present" in out.out
        assert "org/tiny" in out.out

        repo = cache / "models--org--tiny"
        assert (repo / "refs" / "main").read_text() == commit
        snapshot = repo / "snapshots" / commit
        for path in source.iterdir():
            pulled = snapshot / path.name
            assert pulled.is_symlink()
            assert not os.path.isabs(os.readlink(pulled))
            assert pulled.read_bytes() == path.read_bytes()

        # offline, in a fresh process (huggingface_hub reads HF_HUB_OFFLINE at import)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": "http://127.0.0.1:9"}
        out_file = tmp_path / "logits.pt"
        subprocess.run([sys.executable, "-c", _LOAD_OFFLINE, str(cache), str(out_file)],
                       env=env, check=True, timeout=300)
        assert torch.equal(torch.load(out_file), _logits(source))

        # a second pull fetches nothing; a cut-short blob resumes and is verified
        requests_before = hf_hub.requests("model.safetensors")
        assert main(["--url", node.url, "pull", "chat", "--hf-cache", str(cache)]) == 0
        assert "0 fetched" in capsys.readouterr().out
        weights = (snapshot / "model.safetensors").resolve()
        data = weights.read_bytes()
        weights.unlink()
        partial = weights.with_name(weights.name + ".incomplete")
        partial.write_bytes(data[: len(data) // 3])
        assert main(["--url", node.url, "pull", "chat", "--hf-cache", str(cache)]) == 0
        assert weights.read_bytes() == data
        assert not partial.exists()
        assert hf_hub.requests("model.safetensors") == requests_before  # never the origin


def test_a_corrupt_partial_is_refused_not_published(
    tmp_path: Path, hf_hub: FixtureHub, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_tiny_llama(tmp_path / "src")
    hf_hub.add_repo("org/bad", {p.name: p.read_bytes() for p in source.iterdir()})
    settings = {"data_dir": tmp_path / "data", "hf": {"endpoint": hf_hub.endpoint}}
    with running_node(**settings) as node, node.client() as client:
        body = {"models": [{"name": "llm", "source": "hf://org/bad"}]}
        client.put("/v1/pipelines/p", json=body)
        assert wait_for_state(client, "p", {"warm", "failed"})["state"] == "warm"
        cache = tmp_path / "hub-cache"
        assert main(["--url", node.url, "pull", "p", "--hf-cache", str(cache)]) == 0
        commit = (cache / "models--org--bad" / "refs" / "main").read_text()
        weights = (cache / "models--org--bad" / "snapshots" / commit / "model.safetensors")
        blob = weights.resolve()
        data = blob.read_bytes()
        blob.unlink()
        partial = blob.with_name(blob.name + ".incomplete")
        partial.write_bytes(bytes([data[0] ^ 0xFF]) + data[1:100])  # a wrong byte already there
        assert main(["--url", node.url, "pull", "p", "--hf-cache", str(cache)]) == 1
        assert "do not match" in capsys.readouterr().err
        assert not blob.exists()
        assert not partial.exists()
        assert main(["--url", node.url, "pull", "p", "--hf-cache", str(cache)]) == 0
        assert blob.read_bytes() == data


def test_cache_location_and_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert default_hf_cache() == tmp_path / "hf" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert default_hf_cache() == tmp_path / "c"
    assert repo_id_of("hf://org/name@abc", "llm") == "org/name"
    assert repo_id_of("s3://bucket/prefix", "llm") == "llm"
    assert repo_folder("org/name") == "models--org--name"
