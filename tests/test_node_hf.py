"""A node pulling from the local HF-compatible hub: single flight, integrity, space, faults."""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest

from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes

MiB = 1024 * 1024


def _model_files(*, weights: str = "model.safetensors", size: int = 3 * MiB) -> dict[str, bytes]:
    return {
        weights: safetensors_bytes(size),
        "config.json": json.dumps({"model_type": "bert"}).encode(),
        "tokenizer.json": b'{"version": "1.0"}',
    }


def _node(
    tmp_path: Path, hub: FixtureHub, **overrides: object
) -> AbstractContextManager[RunningNode]:
    settings: dict[str, object] = {
        "data_dir": tmp_path / "data",
        "capacity": "1GiB",
        "hf": {"endpoint": hub.endpoint},
        "fetch": {"part_size": "1MiB", "backoff_base_s": 0.05, "retry_budget_s": 20},
    }
    settings.update(overrides)
    return running_node(**settings)


def _blob_files(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "blobs").rglob("*") if p.is_file()]


def test_64_concurrent_registrations_pull_each_file_once(
    tmp_path: Path, hf_hub: FixtureHub
) -> None:
    files = _model_files(size=8 * MiB)
    hf_hub.add_repo("org/model", files)
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        body = {"models": [{"name": "llm", "source": "hf://org/model"}]}

        def register(i: int) -> int:
            with httpx.Client(base_url=node.url, timeout=60) as client:
                return client.put(f"/v1/pipelines/p{i}", json=body).status_code

        with ThreadPoolExecutor(64) as pool:
            codes = list(pool.map(register, range(64)))
        assert set(codes) == {202}
        for i in range(64):
            assert wait_for_state(c, f"p{i}", {"warm", "failed"})["state"] == "warm"
        for path, data in files.items():
            assert hf_hub.bytes_sent(path) == len(data), path
        # stored once, charged to every pipeline in full
        assert len(_blob_files(tmp_path / "data")) == len(files)
        assert c.get("/v1/pipelines/p0").json()["bytes_total"] == sum(map(len, files.values()))


@pytest.mark.parametrize(
    "fault", ["fault-flip", "fault-short", "fault-long", "fault-html", "fault-lfs-pointer"]
)
def test_corrupt_origin_bytes_fail_with_integrity_error_and_commit_nothing(
    tmp_path: Path, hf_hub: FixtureHub, fault: str
) -> None:
    files = _model_files(weights=f"model-{fault}.safetensors")
    hf_hub.add_repo("org/bad", files)
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        c.put("/v1/pipelines/bad", json={"models": [{"name": "m", "source": "hf://org/bad"}]})
        status = wait_for_state(c, "bad", {"warm", "failed"})
        assert status["state"] == "failed"
        assert status["error"]["code"] in ("integrity_error", "origin_error")
        if fault in ("fault-flip", "fault-html"):  # full-length wrong bytes: the digest says so
            assert status["error"]["code"] == "integrity_error"
            assert "expected" in status["error"]["message"]
        store = node.node.store
        committed = {r.sha256 for r in store.records()}
        corrupt = hashlib.sha256(files[f"model-{fault}.safetensors"]).hexdigest()
        assert corrupt not in committed
        assert not (tmp_path / "data" / "blobs" / corrupt[:2] / corrupt).exists()
        assert not list((tmp_path / "data" / "tmp").glob("*.tmp"))


def test_model_larger_than_capacity_is_507_before_any_origin_byte(
    tmp_path: Path, hf_hub: FixtureHub
) -> None:
    hf_hub.add_repo("org/big", _model_files(size=4 * MiB))
    small = _node(tmp_path, hf_hub, capacity="2MiB")
    with small as node, node.client() as c:
        body = {"models": [{"name": "m", "source": "hf://org/big"}]}
        answer = c.put("/v1/pipelines/big", json=body)
        assert answer.status_code == 507
        assert answer.json()["error"]["code"] == "insufficient_storage"
        assert hf_hub.bytes_sent("model.safetensors") == 0
        assert hf_hub.requests("model.safetensors") == 0
        status = c.get("/v1/pipelines/big").json()
        assert status["state"] == "failed"
        assert status["error"]["code"] == "insufficient_storage"


def test_gated_model_without_token_fails_unauthorized(tmp_path: Path, hf_hub: FixtureHub) -> None:
    hf_hub.add_repo("org/gated", _model_files(), gated=True, token="hf_secret")
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        c.put("/v1/pipelines/g", json={"models": [{"name": "m", "source": "hf://org/gated"}]})
        status = wait_for_state(c, "g", {"warm", "failed"})
        assert status["state"] == "failed"
        assert status["error"]["code"] == "unauthorized"
        assert "hf_secret" not in json.dumps(status)


def test_transient_503s_are_retried(tmp_path: Path, hf_hub: FixtureHub) -> None:
    # one part (under part_size) so that the GETs counted are the attempts of one request
    files = _model_files(weights="model-fault-503x2.safetensors", size=MiB // 2)
    hf_hub.add_repo("org/flaky", files)
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        c.put("/v1/pipelines/f", json={"models": [{"name": "m", "source": "hf://org/flaky"}]})
        assert wait_for_state(c, "f", {"warm", "failed"})["state"] == "warm"
        assert hf_hub.requests("model-fault-503x2.safetensors") == 3


def test_tenant_matrix(tmp_path: Path, hf_hub: FixtureHub) -> None:
    hf_hub.add_repo("org/a", _model_files(size=MiB))
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "team-a", "tok-b": "team-b", "tok-ops": "admin"}))
    with _node(tmp_path, hf_hub, tokens_file=tokens) as node:
        with node.client("tok-a") as a:
            assert a.put(
                "/v1/pipelines/pa", json={"models": [{"name": "m", "source": "hf://org/a"}]}
            ).status_code == 202
            wait_for_state(a, "pa", {"warm"})
            manifest = a.get("/v1/pipelines/pa/manifest").json()
            blob = (manifest["tensors"] or manifest["files"])[0]["blob"]
            assert a.get(f"/v1/blobs/{blob}").status_code == 200
        requests = [
            ("GET", "/v1/pipelines/pa"),
            ("GET", "/v1/pipelines/pa/manifest"),
            ("GET", "/v1/pipelines/pa/files"),
            ("POST", "/v1/pipelines/pa/warm"),
            ("POST", "/v1/pipelines/pa/evict"),
            ("POST", "/v1/pipelines/pa/leases"),
            ("DELETE", "/v1/pipelines/pa"),
            ("GET", f"/v1/blobs/{blob}"),
        ]
        for token, expected in ((None, 401), ("wrong", 401), ("tok-b", 404)):
            with node.client(token) as other:
                for method, path in requests:
                    answer = other.request(method, path)
                    assert answer.status_code == expected, (token, method, path, answer.text)
                    assert blob not in answer.text or (expected == 404 and "no blob" in answer.text)
                listing = other.get("/v1/pipelines")
                if expected == 404:
                    assert listing.json() == {"pipelines": []}
                else:
                    assert listing.status_code == 401
        with node.client("tok-ops") as admin:
            assert [p["id"] for p in admin.get("/v1/pipelines").json()["pipelines"]] == ["pa"]
        with node.client("tok-a") as a:
            assert a.get("/v1/pipelines/pa").json()["state"] == "warm"
