"""Eviction through a real node: who goes, who stays, what the API and metrics say about it.

Pipelines come from ``file://`` directories of generated safetensors files, on nodes of a few MiB.
Recency is set without sleeping: a pipeline is made cold by moving its registration and last use
back in the node's own registry, so hot and cold never depend on how fast the machine is.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from safetensors.numpy import save_file

from cache_node.tenants import DEFAULT_TENANT
from clients import cli
from clients.client import Client
from clients.errors import EXIT_REFUSED
from tests.fixtures.metrics import metric_value
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state

MiB = 1024 * 1024
HOUR = 3600.0


def _make_model(directory: Path, *, nbytes: int) -> dict[str, bytes]:
    """A model dir: one safetensors file holding ``nbytes`` of random weights, and a config."""
    directory.mkdir(parents=True)
    weights = np.frombuffer(os.urandom(nbytes), dtype=np.uint8)
    save_file({"w": weights}, str(directory / "model.safetensors"))
    # distinct per model, so no blob is shared and every eviction frees the whole pipeline
    (directory / "config.json").write_text(f'{{"model_type": "bert", "name": "{directory.name}"}}')
    return {p.name: p.read_bytes() for p in directory.iterdir()}


def _settings(tmp_path: Path, *, capacity: int, hot_window_s: float = HOUR) -> dict[str, Any]:
    return {
        "data_dir": tmp_path / "data",
        "capacity": capacity,
        "eviction": {
            "hot_window_s": hot_window_s,
            "high_watermark": 0.99,
            "low_watermark": 0.95,
            "interval_s": 3600,  # the background pass stays out of these tests
        },
    }


def _register(
    c: httpx.Client, pipeline_id: str, source: Path, *, pinned: bool = False
) -> httpx.Response:
    body = {"models": [{"name": "m", "source": f"file://{source}"}], "pinned": pinned}
    return c.put(f"/v1/pipelines/{pipeline_id}", json=body)


def _warm(c: httpx.Client, pipeline_id: str, source: Path, *, pinned: bool = False) -> None:
    answer = _register(c, pipeline_id, source, pinned=pinned)
    assert answer.status_code == 202, answer.text
    status = wait_for_state(c, pipeline_id, {"warm", "failed"})
    assert status["state"] == "warm", status


def _age(node: RunningNode, pipeline_id: str, *, seconds: float) -> None:
    """Move a pipeline's registration and last use ``seconds`` into the past."""
    registry = node.node.registry
    record = registry.get(DEFAULT_TENANT, pipeline_id)
    assert record is not None
    past = time.time() - seconds
    record.registered_at = past
    if record.last_used_at is not None:
        record.last_used_at = past
    registry.put(record)


def _load(c: httpx.Client, pipeline_id: str) -> dict[str, Any]:
    """What a replica does first: ask for the manifest (the node counts it as a use)."""
    answer = c.get(f"/v1/pipelines/{pipeline_id}/manifest", params={"tp_size": 1, "rank": 0})
    assert answer.status_code == 200, answer.text
    manifest: dict[str, Any] = answer.json()
    return manifest


def _du(data_dir: Path) -> dict[str, int]:
    """Every blob file on disk with its size."""
    return {p.name: p.stat().st_size for p in (data_dir / "blobs").rglob("*") if p.is_file()}


def _pipeline_bytes(files: dict[str, bytes]) -> int:
    return sum(map(len, files.values()))


def test_room_is_made_from_cold_pipelines_in_lru_order_never_hot_pinned_or_leased(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    sizes = {name: _make_model(src / name, nbytes=MiB) for name in
             ("pinned", "leased", "cold-old", "cold-busy", "hot")}
    newcomer = _make_model(src / "new", nbytes=2 * MiB)
    # Five 1 MiB pipelines leave under 1 MiB free: the 2 MiB newcomer needs exactly two victims.
    with running_node(**_settings(tmp_path, capacity=6 * MiB)) as node, node.client() as c:
        for name in sizes:
            _warm(c, name, src / name, pinned=name == "pinned")
        lease = c.post("/v1/pipelines/leased/leases")
        assert lease.status_code == 201, lease.text
        for _ in range(3):
            _load(c, "cold-busy")
        # Oldest first: pinned and leased are the least recently used of all, and cold-busy,
        # used three times, keeps a higher score than the untouched hot pipeline; so a policy
        # that ignored pins, leases or the hot window would pick differently.
        for name, age in (("pinned", 5), ("leased", 4), ("cold-old", 3), ("cold-busy", 1)):
            _age(node, name, seconds=age * HOUR)
        # "hot" on the wire means used within the window: "hot" was only registered, so the
        # policy shelters it (below) but the status does not call it hot.
        hot_flags = {name: c.get(f"/v1/pipelines/{name}").json()["hot"] for name in sizes}
        assert hot_flags == {
            "pinned": False, "leased": False, "cold-old": False, "cold-busy": False, "hot": False
        }

        _warm(c, "new", src / "new")

        states = {name: c.get(f"/v1/pipelines/{name}").json() for name in [*sizes, "new"]}
        assert {n: s["state"] for n, s in states.items()} == {
            "pinned": "warm", "leased": "warm", "cold-old": "evicted", "cold-busy": "evicted",
            "hot": "warm", "new": "warm",
        }
        for name in ("cold-old", "cold-busy"):
            assert states[name]["evicted_reason"] == "cold"
            assert states[name]["bytes_cached"] == 0
        for name in ("pinned", "leased", "hot", "new"):
            assert states[name]["evicted_reason"] is None
            assert states[name]["bytes_cached"] == states[name]["bytes_total"]

        evicted_bytes = _pipeline_bytes(sizes["cold-old"]) + _pipeline_bytes(sizes["cold-busy"])
        assert metric_value(c, "weightcache_evictions_total", reason="cold") == 2
        assert metric_value(c, "weightcache_evicted_bytes_total", reason="cold") == evicted_bytes
        assert metric_value(c, "weightcache_evictions_total", reason="hot-window") == 0

        kept = sum(_pipeline_bytes(sizes[n]) for n in ("pinned", "leased", "hot"))
        kept += _pipeline_bytes(newcomer)
        info = c.get("/v1/node").json()
        on_disk = _du(tmp_path / "data")
        assert info["capacity"] == 6 * MiB
        assert info["used"] == sum(on_disk.values()) == kept
        assert info["reserved"] == 0
        assert info["free"] == info["capacity"] - info["used"] - info["reserved"] - info["temp"]
        assert (info["high_watermark"], info["low_watermark"]) == (0.99, 0.95)
        assert metric_value(c, "weightcache_bytes", state="committed") == kept


def test_with_every_pipeline_cold_the_least_recently_loaded_one_goes(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name in ("a", "b", "c", "d"):
        _make_model(src / name, nbytes=MiB)
    settings = _settings(tmp_path, capacity=int(3.5 * MiB), hot_window_s=0)
    with running_node(**settings) as node, node.client() as c:
        for name in ("a", "b", "c"):
            _warm(c, name, src / name)
        manifests = {name: _load(c, name) for name in ("b", "a", "c")}  # b is used first
        _warm(c, "d", src / "d")
        states = {n: c.get(f"/v1/pipelines/{n}").json()["state"] for n in "abcd"}
        assert states == {"a": "warm", "b": "evicted", "c": "warm", "d": "warm"}
        assert c.get("/v1/pipelines/b").json()["evicted_reason"] == "cold"
        for name in ("a", "c"):  # the survivors still serve their bytes
            for blob in manifests[name]["blobs"]:
                body = c.get(f"/v1/blobs/{blob['sha256']}").content
                assert hashlib.sha256(body).hexdigest() == blob["sha256"]
        gone = {b["sha256"] for b in manifests["b"]["blobs"]}
        assert gone.isdisjoint(_du(tmp_path / "data"))
        assert all(c.get(f"/v1/blobs/{sha}").status_code == 404 for sha in gone)


@pytest.mark.parametrize("holds", [("pin", "pin", "pin"), ("pin", "lease", "lease")])
def test_nothing_evictable_is_507_and_nothing_is_evicted(
    tmp_path: Path, holds: tuple[str, ...]
) -> None:
    src = tmp_path / "src"
    names = [f"p{i}" for i in range(len(holds))]
    for name in [*names, "new"]:
        _make_model(src / name, nbytes=MiB)
    with running_node(**_settings(tmp_path, capacity=int(3.5 * MiB))) as node, node.client() as c:
        for name, hold in zip(names, holds, strict=True):
            _warm(c, name, src / name, pinned=hold == "pin")
            if hold == "lease":
                assert c.post(f"/v1/pipelines/{name}/leases").status_code == 201
            _age(node, name, seconds=10 * HOUR)  # cold: only the pin or lease protects it
        before_disk = _du(tmp_path / "data")
        before_used = c.get("/v1/node").json()["used"]

        answer = _register(c, "new", src / "new")

        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "insufficient_storage"
        assert c.get("/v1/pipelines/new").json()["state"] == "failed"
        for name in names:
            status = c.get(f"/v1/pipelines/{name}").json()
            assert status["state"] == "warm", status
            assert status["bytes_cached"] == status["bytes_total"]
        assert _du(tmp_path / "data") == before_disk
        info = c.get("/v1/node").json()
        assert info["used"] == before_used
        assert info["reserved"] == 0
        assert metric_value(c, "weightcache_evictions_total", reason="cold") == 0
        assert metric_value(c, "weightcache_evicted_bytes_total", reason="cold") == 0
        assert metric_value(c, "weightcache_insufficient_storage_total") == 1


def test_a_pipeline_that_cannot_fit_as_a_whole_evicts_nothing(tmp_path: Path) -> None:
    """Room is made for the whole pipeline or not at all, not file by file: evicting for the
    first file and then failing on the second would throw warm weights away for nothing."""
    src = tmp_path / "src"
    _make_model(src / "pinned", nbytes=2 * MiB)
    cold = _make_model(src / "cold", nbytes=MiB)
    (src / "two").mkdir()
    for name in ("a", "b"):  # each file fits after evicting "cold"; both together never do
        weights = np.frombuffer(os.urandom(MiB), dtype=np.uint8)
        save_file({"w": weights}, str(src / "two" / f"{name}.safetensors"))
    with running_node(**_settings(tmp_path, capacity=int(3.5 * MiB))) as node, node.client() as c:
        _warm(c, "pinned", src / "pinned", pinned=True)
        _warm(c, "cold", src / "cold")
        _age(node, "cold", seconds=10 * HOUR)
        before_disk = _du(tmp_path / "data")

        answer = _register(c, "two", src / "two")

        assert answer.status_code == 507, answer.text
        assert c.get("/v1/pipelines/cold").json()["state"] == "warm"
        assert _du(tmp_path / "data") == before_disk
        assert c.get("/v1/node").json()["used"] == sum(before_disk.values())
        assert metric_value(c, "weightcache_evictions_total", reason="cold") == 0
        assert _pipeline_bytes(cold) == c.get("/v1/pipelines/cold").json()["bytes_cached"]


def test_a_read_in_flight_completes_with_correct_bytes_when_its_pipeline_is_evicted(
    tmp_path: Path,
) -> None:
    src = tmp_path / "src"
    files = _make_model(src / "big", nbytes=20 * MiB)
    expected = files["model.safetensors"]
    sha = hashlib.sha256(expected).hexdigest()
    with running_node(**_settings(tmp_path, capacity=64 * MiB)) as node, node.client() as c:
        _warm(c, "big", src / "big")
        blob_file = tmp_path / "data" / "blobs" / sha[:2] / sha
        an_hour_ago = time.time() - 3600
        os.utime(blob_file, (an_hour_ago, an_hour_ago))  # as old as most blobs are
        # A whole read first: the chunk is then known good, and later reads stream it in
        # pieces straight from the open file, so most of the body is read after the unlink.
        assert hashlib.sha256(c.get(f"/v1/blobs/{sha}").content).hexdigest() == sha
        received = bytearray()
        with node.client() as reader, reader.stream("GET", f"/v1/blobs/{sha}") as stream:
            assert stream.status_code == 200
            pieces = stream.iter_bytes(chunk_size=MiB)
            received += next(pieces)
            evicted = c.post("/v1/pipelines/big/evict")
            assert evicted.status_code == 202, evicted.text
            assert evicted.json()["state"] == "evicted"
            assert not (tmp_path / "data" / "blobs" / sha[:2] / sha).exists()
            for piece in pieces:
                received += piece
        assert len(received) == len(expected)
        assert hashlib.sha256(received).hexdigest() == sha
        assert c.get(f"/v1/blobs/{sha}").status_code == 404

        # The same at the store: a generator holding the file open outlives the delete.
        _warm(c, "big", src / "big")
        os.utime(blob_file, (an_hour_ago, an_hour_ago))
        store = node.node.store
        assert b"".join(store.iter_verified(sha, 0, len(expected))) == expected
        reading = store.iter_verified(sha, 0, len(expected))
        first = next(reading)
        assert 0 < len(first) < len(expected)
        assert store.delete(sha) == len(expected)
        assert not store.blob_path(sha).exists()
        assert first + b"".join(reading) == expected


def test_wait_until_warm_rewarms_an_evicted_pipeline(tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = _make_model(src / "m", nbytes=MiB)
    with running_node(**_settings(tmp_path, capacity=8 * MiB)) as node, Client(node.url) as client:
        client.register("m", models=[{"name": "m", "source": f"file://{src / 'm'}"}])
        assert client.wait_until_warm("m", poll_s=0.02, timeout_s=60).state == "warm"
        evicted = client.evict("m")
        assert evicted.state == "evicted"
        assert evicted.evicted_reason == "manual"
        assert _du(tmp_path / "data") == {}
        assert client.node().used == 0

        seen: list[str] = []
        status = client.wait_until_warm(
            "m", poll_s=0.02, timeout_s=60, on_status=lambda s: seen.append(s.state)
        )

        assert status.state == "warm"
        assert status.evicted_reason is None
        assert seen[0] in ("warming", "warm")
        assert "evicted" not in seen
        assert status.bytes_cached == status.bytes_total == _pipeline_bytes(files)
        manifest = client.manifest("m")
        for blob in manifest.blobs:
            body = client.http.get(f"/v1/blobs/{blob.sha256}").content
            assert hashlib.sha256(body).hexdigest() == blob.sha256
        assert client.node().used == _pipeline_bytes(files)


def test_cli_evict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    files = {name: _make_model(src / name, nbytes=MiB // 4) for name in ("free", "held")}
    with running_node(**_settings(tmp_path, capacity=8 * MiB)) as node, node.client() as c:
        for name in files:
            _warm(c, name, src / name)
        assert c.post("/v1/pipelines/held/leases").status_code == 201
        capsys.readouterr()

        assert cli.main(["--url", node.url, "evict", "free"]) == 0
        assert capsys.readouterr().out.strip() == "free: evicted"
        status = c.get("/v1/pipelines/free").json()
        assert (status["state"], status["evicted_reason"]) == ("evicted", "manual")
        assert metric_value(c, "weightcache_evictions_total", reason="manual") == 1
        freed = _pipeline_bytes(files["free"])
        assert metric_value(c, "weightcache_evicted_bytes_total", reason="manual") == freed

        # a leased pipeline is being loaded by a replica: refused, and it stays warm
        assert cli.main(["--url", node.url, "evict", "held"]) == EXIT_REFUSED
        assert "conflict" in capsys.readouterr().err
        assert c.get("/v1/pipelines/held").json()["state"] == "warm"
        assert metric_value(c, "weightcache_evictions_total", reason="manual") == 1
        assert c.get("/v1/node").json()["used"] == _pipeline_bytes(files["held"])
