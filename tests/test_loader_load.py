"""``loader.load`` end to end against a real cache node: lease, manifest, stream, release."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from clients.errors import NotFoundError
from loader import NotWarmError, load, load_all_ranks
from tests.fixtures.node_server import running_node, wait_for_state


def _make_model(directory: Path) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    first = {
        "model.embed_tokens.weight": torch.randn(64, 32, generator=generator).bfloat16(),
        "model.norm.weight": torch.randn(32, generator=generator),
    }
    second = {
        "model.layers.0.mlp.up_proj.weight": torch.randn(40, 32, generator=generator).half(),
        "lm_head.weight": torch.randn(64, 32, generator=generator).to(torch.float8_e4m3fn),
        "step": torch.tensor(7, dtype=torch.int64),
    }
    save_file(first, str(directory / "model-00001-of-00002.safetensors"))
    save_file(second, str(directory / "model-00002-of-00002.safetensors"))
    (directory / "config.json").write_text('{"model_type": "unknown-arch"}')
    loaded = load_file(str(directory / "model-00001-of-00002.safetensors"))
    loaded.update(load_file(str(directory / "model-00002-of-00002.safetensors")))
    return loaded


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(
            actual[name].reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8)
        ), name


def test_load_through_a_node(tmp_path: Path) -> None:
    expected = _make_model(tmp_path / "src")
    data_dir = tmp_path / "data"
    with running_node(data_dir=data_dir, capacity="1GiB") as node, node.client() as client:
        answer = client.put(
            "/v1/pipelines/tiny",
            json={"models": [{"name": "llm", "source": f"file://{tmp_path / 'src'}"}]},
        )
        assert answer.status_code == 202, answer.text
        assert wait_for_state(client, "tiny", {"warm", "failed"})["state"] == "warm"

        over_http = load("tiny", url=node.url, request_size=256, workers=4)
        _assert_same(over_http.tensors, expected)
        report = over_http.report.as_dict()
        assert report["bytes_delivered"] == sum(t.nbytes for t in expected.values())
        assert report["requests"] > 4
        assert {"lease_s", "manifest_s", "connect_s", "stream_s", "gb_per_s"} <= report.keys()
        assert any(f.path == "config.json" for f in over_http.files)

        verified = load("tiny", url=node.url, verify=True)
        _assert_same(verified.tensors, expected)
        assert verified.report.stream.verified_chunks >= 2

        local = load("tiny", url=node.url, local_dir=data_dir)
        _assert_same(local.tensors, expected)

        # A dead first data URL fails over to the node.
        dead = "http://127.0.0.1:9"
        failover = load("tiny", url=node.url, data_urls=[dead, node.url])
        _assert_same(failover.tensors, expected)

        # Every lease taken above was released.
        assert client.get("/v1/pipelines/tiny").json()["active_leases"] == 0

        everyone = load_all_ranks("tiny", tp_size=1, devices=["cpu"], url=node.url)
        assert len(everyone.ranks) == 1
        _assert_same(everyone.ranks[0].tensors, expected)


def test_not_warm_and_missing(tmp_path: Path) -> None:
    _make_model(tmp_path / "src")
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as client:
        with pytest.raises(NotFoundError) as missing:
            load("nope", url=node.url)
        assert missing.value.status == 404
        client.put(
            "/v1/pipelines/tiny",
            json={"models": [{"name": "llm", "source": f"file://{tmp_path / 'src'}"}]},
        )
        wait_for_state(client, "tiny", {"warm", "failed"})
        assert client.post("/v1/pipelines/tiny/evict").status_code == 202
        wait_for_state(client, "tiny", {"evicted", "cold"})
        with pytest.raises(NotWarmError) as not_warm:
            load("tiny", url=node.url)
        assert not_warm.value.state in {"evicted", "cold"}
        assert client.get("/v1/pipelines/tiny").json()["active_leases"] == 0


def test_url_and_token_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _make_model(tmp_path / "src")
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as client:
        client.put(
            "/v1/pipelines/tiny",
            json={"models": [{"name": "llm", "source": f"file://{tmp_path / 'src'}"}]},
        )
        wait_for_state(client, "tiny", {"warm"})
        monkeypatch.setenv("WEIGHTCACHE_URL", node.url)
        with httpx.Client() as http:
            result = load("tiny", http=http)
            assert not http.is_closed  # a caller's client is left open
        _assert_same(result.tensors, expected)
