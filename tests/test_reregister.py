"""Re-registering never takes a warm copy offline: the new spec fills beside the warm one."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.cli import main as cli_main
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes

CONFIG = b'{"model_type": "llama"}'
MISSING_COMMIT = "0" * 40


@pytest.fixture
def hub() -> Iterator[FixtureHub]:
    # A hub of this module's own: its stalls are long enough to catch a fill in progress.
    with FixtureHub(stall_s=30.0) as server:
        yield server


def _node(tmp_path: Path, hub: FixtureHub, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "capacity": "1GiB",
        "hf": {"endpoint": hub.endpoint},
        "fetch": {"part_size": "1MiB", "backoff_base_s": 0.01, "stall_timeout_s": 60},
    }
    settings.update(overrides)
    return running_node(**settings)


def _spec(source: str, **extra: Any) -> dict[str, Any]:
    return {"models": [{"name": "m", "source": source}], **extra}


def _blob_of(client: httpx.Client, pipeline: str) -> str:
    manifest = client.get(f"/v1/pipelines/{pipeline}/manifest",
                          params={"tp_size": 1, "rank": 0})
    assert manifest.status_code == 200, manifest.text
    (blob,) = {t["blob"] for t in manifest.json()["tensors"]}
    return str(blob)


def _blobs_on_disk(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "blobs").rglob("*") if p.is_file()}


def _serves(client: httpx.Client, pipeline: str, blob: str, data: bytes) -> None:
    """The pipeline is warm and serves its manifest, a lease and the bytes of ``blob``."""
    status = client.get(f"/v1/pipelines/{pipeline}").json()
    assert status["state"] == "warm", status
    assert _blob_of(client, pipeline) == blob
    lease = client.post(f"/v1/pipelines/{pipeline}/leases")
    assert lease.status_code == 201
    assert client.delete(f"/v1/leases/{lease.json()['lease_id']}").status_code == 204
    assert client.get(f"/v1/blobs/{blob}").content == data


def test_a_failed_reregistration_leaves_the_warm_version_serving(
    tmp_path: Path, hub: FixtureHub, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = safetensors_bytes(4096)
    hub.add_repo("org/m", {"model.safetensors": weights, "config.json": CONFIG})
    with _node(tmp_path, hub) as node, node.client() as c:
        c.put("/v1/pipelines/p", json=_spec("hf://org/m"))
        wait_for_state(c, "p", {"warm"})
        blob = _blob_of(c, "p")

        answer = c.put("/v1/pipelines/p", json=_spec(f"hf://org/m@{MISSING_COMMIT}"))
        assert answer.status_code == 202
        assert answer.json()["state"] == "warm"  # never failed, never cold in between
        status = c.get("/v1/pipelines/p").json()
        assert status["state"] == "warm"
        assert status["error"] is None
        assert status["pending"] is None
        attempt = status["last_attempt"]
        assert attempt["state"] == "failed"
        assert attempt["error"]["code"] == "origin_not_found"
        assert attempt["models"][0]["source"] == f"hf://org/m@{MISSING_COMMIT}"
        _serves(c, "p", blob, weights)
        assert blob in _blobs_on_disk(tmp_path / "data")
        # the CLI says the new spec failed, and that the old one stays warm
        assert cli_main(["--url", node.url, "warm", "p", "--wait"]) == 1
        assert "stays warm" in capsys.readouterr().err


def test_a_good_reregistration_swaps_in_and_frees_the_old_bytes_after_the_last_lease(
    tmp_path: Path, hub: FixtureHub
) -> None:
    old, new = safetensors_bytes(4096), safetensors_bytes(2048)
    first = hub.add_repo("org/m", {"model.safetensors": old, "config.json": CONFIG})
    second = hub.add_repo("org/m", {"model.safetensors": new, "config.json": CONFIG})
    with _node(tmp_path, hub) as node, node.client() as c:
        c.put("/v1/pipelines/p", json=_spec(f"hf://org/m@{first}"))
        wait_for_state(c, "p", {"warm"})
        old_blob = _blob_of(c, "p")
        lease = c.post("/v1/pipelines/p/leases").json()  # a replica reading the old version

        c.put("/v1/pipelines/p", json=_spec(f"hf://org/m@{second}"))
        deadline = time.monotonic() + 60
        while c.get("/v1/pipelines/p").json()["pending"] is not None:
            assert time.monotonic() < deadline, "the new spec never finished"
            time.sleep(0.05)
        status = c.get("/v1/pipelines/p").json()
        assert status["state"] == "warm"
        assert status["last_attempt"] is None
        assert status["models"][0]["revision"] == second
        new_blob = _blob_of(c, "p")
        assert new_blob != old_blob
        # the old version's bytes outlive the swap while the lease taken before it lives
        assert c.get(f"/v1/blobs/{old_blob}").content == old
        assert old_blob in _blobs_on_disk(tmp_path / "data")
        assert c.delete(f"/v1/leases/{lease['lease_id']}").status_code == 204
        assert c.get(f"/v1/blobs/{old_blob}").status_code == 404
        assert old_blob not in _blobs_on_disk(tmp_path / "data")
        _serves(c, "p", new_blob, new)
        node_info = c.get("/v1/node").json()
        assert node_info["reserved"] == 0
        assert node_info["used"] == sum(
            p.stat().st_size for p in (tmp_path / "data" / "blobs").rglob("*") if p.is_file()
        )


def test_delete_and_evict_while_a_reregistration_fills(tmp_path: Path, hub: FixtureHub) -> None:
    weights = safetensors_bytes(4096)
    hub.add_repo("org/m", {"model.safetensors": weights, "config.json": CONFIG})
    # its weights stall halfway for 30 s: the re-registration is still filling below
    hub.add_repo("org/slow", {"model-fault-stall.safetensors": safetensors_bytes(3 << 20),
                              "config.json": CONFIG})
    with _node(tmp_path, hub) as node, node.client() as c:
        for name in ("del", "evi"):
            c.put(f"/v1/pipelines/{name}", json=_spec("hf://org/m"))
            wait_for_state(c, name, {"warm"})
        blob = _blob_of(c, "del")

        for name in ("del", "evi"):
            c.put(f"/v1/pipelines/{name}", json=_spec("hf://org/slow"))
            status = c.get(f"/v1/pipelines/{name}").json()
            assert status["state"] == "warm"
            assert status["pending"]["state"] == "warming"
            _serves(c, name, blob, weights)
            # the policy does not take a pipeline whose new spec is filling
        assert c.delete("/v1/pipelines/del").status_code == 204
        assert c.get("/v1/pipelines/del").status_code == 404

        assert c.post("/v1/pipelines/evi/evict").status_code == 202
        status = c.get("/v1/pipelines/evi").json()
        assert status["state"] == "evicted"
        assert status["pending"] is None
        # the newest registered spec is what the next warm warms
        assert status["models"][0]["source"] == "hf://org/slow"
        assert c.get("/v1/pipelines/evi/manifest", params={"tp_size": 1, "rank": 0}
                     ).status_code == 409
        assert _blobs_on_disk(tmp_path / "data") == set()
        assert c.get("/v1/node").json()["used"] == 0


def test_concurrent_reregistrations_end_in_one_warm_spec_and_no_stray_bytes(
    tmp_path: Path, hub: FixtureHub
) -> None:
    commits = [
        hub.add_repo("org/m", {"model.safetensors": safetensors_bytes(1024 + i),
                               "config.json": CONFIG})
        for i in range(6)
    ]
    with _node(tmp_path, hub) as node, node.client() as c:
        c.put("/v1/pipelines/p", json=_spec(f"hf://org/m@{commits[0]}"))
        wait_for_state(c, "p", {"warm"})

        def register(commit: str) -> int:
            with httpx.Client(base_url=node.url, timeout=60) as client:
                return client.put("/v1/pipelines/p",
                                  json=_spec(f"hf://org/m@{commit}")).status_code

        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(register, commits[1:] * 2))
        assert set(codes) <= {200, 202}
        deadline = time.monotonic() + 60
        while (status := c.get("/v1/pipelines/p").json())["pending"] is not None:
            assert status["state"] == "warm"  # serving all along
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["state"] == "warm"
        assert status["last_attempt"] is None
        revision = status["models"][0]["revision"]
        assert revision in commits[1:]
        # exactly the warm version's blobs are on disk: every other attempt's were freed
        files = c.get("/v1/pipelines/p/files").json()["files"]
        deadline = time.monotonic() + 30
        while _blobs_on_disk(tmp_path / "data") != {f["blob"] for f in files}:
            assert time.monotonic() < deadline, _blobs_on_disk(tmp_path / "data")
            time.sleep(0.05)
        assert c.get("/v1/node").json()["reserved"] == 0


def test_retired_bytes_go_when_the_pre_swap_lease_expires(tmp_path: Path, hub: FixtureHub) -> None:
    old, new = safetensors_bytes(1024), safetensors_bytes(512)
    first = hub.add_repo("org/m", {"model.safetensors": old, "config.json": CONFIG})
    second = hub.add_repo("org/m", {"model.safetensors": new, "config.json": CONFIG})
    with _node(tmp_path, hub, lease_ttl_s=1.0, retry={"poll_s": 0.1}) as node, \
            node.client() as c:
        c.put("/v1/pipelines/p", json=_spec(f"hf://org/m@{first}"))
        wait_for_state(c, "p", {"warm"})
        old_blob = _blob_of(c, "p")
        c.post("/v1/pipelines/p/leases")  # a replica that dies without releasing it
        c.put("/v1/pipelines/p", json=_spec(f"hf://org/m@{second}"))
        deadline = time.monotonic() + 60
        while c.get("/v1/pipelines/p").json()["pending"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert c.get(f"/v1/blobs/{old_blob}").status_code == 200
        while old_blob in _blobs_on_disk(tmp_path / "data"):  # the lease expires: freed
            assert time.monotonic() < deadline, "retired bytes outlived their lease"
            time.sleep(0.05)
        assert c.get(f"/v1/blobs/{old_blob}").status_code == 404


def test_registering_the_filling_or_the_warm_spec_again(tmp_path: Path, hub: FixtureHub) -> None:
    hub.add_repo("org/m", {"model.safetensors": safetensors_bytes(256), "config.json": CONFIG})
    hub.add_repo("org/slow", {"model-fault-stall.safetensors": safetensors_bytes(3 << 20),
                              "config.json": CONFIG})
    with _node(tmp_path, hub) as node, node.client() as c:
        c.put("/v1/pipelines/p", json=_spec("hf://org/m"))
        wait_for_state(c, "p", {"warm"})
        assert c.put("/v1/pipelines/p", json=_spec("hf://org/slow")).status_code == 202
        # the spec already filling: unchanged
        assert c.put("/v1/pipelines/p", json=_spec("hf://org/slow")).status_code == 200
        # back to the warm spec: the filling one is dropped
        answer = c.put("/v1/pipelines/p", json=_spec("hf://org/m"))
        assert answer.status_code == 202
        assert answer.json()["pending"] is None
        assert answer.json()["state"] == "warm"
        assert c.put("/v1/pipelines/p", json=_spec("hf://org/m")).status_code == 200
        # a pin alone changes nothing to fetch: the new spec is warm at once
        c.put("/v1/pipelines/p", json=_spec("hf://org/m", pinned=True))
        deadline = time.monotonic() + 30
        while (status := c.get("/v1/pipelines/p").json())["pending"] is not None:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert status["pinned"] is True
        assert status["state"] == "warm"


def test_a_transiently_failed_reregistration_is_retried_and_swaps_in(
    tmp_path: Path, hub: FixtureHub
) -> None:
    hub.add_repo("org/m", {"model.safetensors": safetensors_bytes(256), "config.json": CONFIG})
    hub.add_repo("org/flaky", {"model-fault-503x1.safetensors": safetensors_bytes(512),
                               "config.json": CONFIG})
    with _node(tmp_path, hub, fetch={"max_attempts": 1}, retry={"base_s": 0.5}) as node, \
            node.client() as c:
        c.put("/v1/pipelines/p", json=_spec("hf://org/m"))
        wait_for_state(c, "p", {"warm"})
        c.put("/v1/pipelines/p", json=_spec("hf://org/flaky"))
        deadline = time.monotonic() + 60
        seen_failed = False
        while (status := c.get("/v1/pipelines/p").json())["models"][0]["source"] != (
            "hf://org/flaky"
        ):
            assert status["state"] == "warm"
            attempt = status["last_attempt"]
            if attempt is not None:
                assert attempt["error"]["code"] == "origin_error"
                assert attempt["error"]["retry_at"] is not None
                seen_failed = True
            assert time.monotonic() < deadline, status
            time.sleep(0.05)
        assert seen_failed
        assert status["state"] == "warm"
        assert status["last_attempt"] is None
        assert hub.requests("model-fault-503x1.safetensors") == 2
