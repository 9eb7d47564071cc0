"""``GET /metrics`` before and after each event: every counter moves by exactly what happened (I10).

Each test runs a real node and reads its Prometheus text with ``prometheus_client``'s parser:
a fill, a second pipeline on the same files (hits), a request that joins a transfer in flight
(coalesced), an integrity failure, a 507, and a replica load that reports its stage timings.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loader.loading import load
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state

KiB = 1024
MiB = 1024 * KiB
STAGES = ("lease", "manifest", "connect", "stream", "verify", "total")


class Scrape:
    """One reading of ``/metrics``: sample values by name and labels."""

    def __init__(self, text: str) -> None:
        self.samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                key = (sample.name, frozenset(sample.labels.items()))
                self.samples[key] = sample.value

    def get(self, name: str, **labels: str) -> float:
        """The sample's value; 0 for a labelled child that was never touched."""
        return self.samples.get((name, frozenset(labels.items())), 0.0)


def scrape(client: httpx.Client) -> Scrape:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("text/plain")
    return Scrape(answer.text)


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def _local_model(directory: Path) -> dict[str, bytes]:
    files = {
        "model.safetensors": _safetensors(256 * KiB),
        "config.json": json.dumps({"model_type": "llama"}).encode(),
        "tokenizer.json": b'{"version": "1.0", "model": {}}',
    }
    directory.mkdir(parents=True)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    return files


def _safetensors(nbytes: int) -> bytes:
    """A valid safetensors file with one uint8 tensor of ``nbytes`` random bytes."""
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}
    ).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + os.urandom(nbytes)


def _register(client: httpx.Client, pipeline_id: str, source: str) -> httpx.Response:
    return client.put(
        f"/v1/pipelines/{pipeline_id}", json={"models": [{"name": "m", "source": source}]}
    )


def _hub_node(tmp_path: Path, hub: FixtureHub, **overrides: Any) -> Any:
    settings: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "capacity": "256MiB",
        "hf": {"endpoint": hub.endpoint},
        "fetch": {"backoff_base_s": 0.05, "backoff_cap_s": 0.1},
    }
    settings.update(overrides)
    return running_node(**settings)


def test_fill_then_hits_count_files_and_bytes(tmp_path: Path) -> None:
    files = _local_model(tmp_path / "models" / "tiny")
    source = f"file://{tmp_path / 'models' / 'tiny'}"
    total = sum(len(d) for d in files.values())
    with running_node(
        data_dir=tmp_path / "data", capacity="64MiB", local_roots=[tmp_path / "models"]
    ) as node, node.client() as c:
        before = scrape(c)
        assert _register(c, "first", source).status_code == 202
        status = wait_for_state(c, "first", {"warm", "failed"})
        assert status["state"] == "warm", status
        assert status["models"][0]["files"] == len(files)
        filled = scrape(c)
        assert moved(before, filled, "weightcache_origin_fetches_total", result="ok") == 3
        assert moved(before, filled, "weightcache_origin_fetches_total", result="error") == 0
        assert moved(before, filled, "weightcache_origin_bytes_total") == total
        assert moved(before, filled, "weightcache_cache_requests_total", result="miss") == 3
        assert moved(before, filled, "weightcache_cache_requests_total", result="hit") == 0
        assert moved(before, filled, "weightcache_coalesced_waiters_total") == 0
        # the space gauges say what GET /v1/node says, in bytes
        node_info = c.get("/v1/node").json()
        for gauge, field in (("capacity", "capacity"), ("used", "used"),
                             ("reserved", "reserved"), ("free", "free")):
            assert filled.get(f"weightcache_{gauge}_bytes") == node_info[field], gauge
        assert filled.get("weightcache_used_bytes") == total
        assert filled.get("weightcache_bytes", state="committed") == total
        assert filled.get("weightcache_bytes", state="reserved") == 0
        assert filled.get("weightcache_pipelines", state="warm") == 1

        # the same files for a second pipeline: all hits, nothing from the origin
        assert _register(c, "second", source).status_code == 202
        assert wait_for_state(c, "second", {"warm", "failed"})["state"] == "warm"
        hits = scrape(c)
        assert moved(filled, hits, "weightcache_cache_requests_total", result="hit") == 3
        assert moved(filled, hits, "weightcache_cache_requests_total", result="miss") == 0
        assert moved(filled, hits, "weightcache_origin_fetches_total", result="ok") == 0
        assert moved(filled, hits, "weightcache_origin_bytes_total") == 0
        assert hits.get("weightcache_bytes", state="committed") == total  # stored once
        assert hits.get("weightcache_pipelines", state="warm") == 2

        # serving a blob counts its bytes, a range only the range
        manifest = c.get("/v1/pipelines/first/manifest").json()
        blob = manifest["files"][0]
        assert c.get(f"/v1/blobs/{blob['blob']}").content
        assert c.get(f"/v1/blobs/{blob['blob']}", headers={"Range": "bytes=2-5"}).status_code == 206
        served = scrape(c)
        assert moved(hits, served, "weightcache_bytes_served_total") == blob["size"] + 4


def test_a_request_that_joins_a_transfer_in_flight_is_one_coalesced_waiter(
    tmp_path: Path,
) -> None:
    # over 2 MiB: the first half holds whole 1 MiB chunks, so progress shows before the stall
    weights = _safetensors(4 * MiB)
    with FixtureHub(stall_s=4.0) as hub, _hub_node(tmp_path, hub) as node, node.client() as c:
        # the weights' first GET sends half, then stalls: the second pipeline arrives meanwhile
        hub.add_repo("org/slow", {"weights-fault-stall.safetensors": weights})
        before = scrape(c)
        assert _register(c, "leader", "hf://org/slow").status_code == 202
        deadline = time.monotonic() + 30
        while c.get("/v1/pipelines/leader").json()["bytes_cached"] == 0:
            assert time.monotonic() < deadline, "the leader's transfer never started"
            time.sleep(0.02)
        assert _register(c, "follower", "hf://org/slow").status_code == 202
        for pipeline_id in ("leader", "follower"):
            assert wait_for_state(c, pipeline_id, {"warm", "failed"})["state"] == "warm"
        after = scrape(c)
        assert moved(before, after, "weightcache_coalesced_waiters_total") == 1
        assert moved(before, after, "weightcache_origin_fetches_total", result="ok") == 1
        assert moved(before, after, "weightcache_cache_requests_total", result="miss") == 1
        assert moved(before, after, "weightcache_origin_bytes_total") == len(weights)
        assert hub.requests("weights-fault-stall.safetensors") == 1


def test_an_integrity_failure_counts_one_mismatch_and_commits_nothing(tmp_path: Path) -> None:
    with FixtureHub() as hub, _hub_node(tmp_path, hub) as node, node.client() as c:
        # the hub declares the real sha256 and serves the bytes with one bit flipped
        hub.add_repo("org/flipped", {"model-fault-flip.safetensors": _safetensors(512 * KiB)})
        before = scrape(c)
        assert _register(c, "flipped", "hf://org/flipped").status_code == 202
        status = wait_for_state(c, "flipped", {"warm", "failed"})
        assert status["state"] == "failed"
        assert status["error"]["code"] == "integrity_error"
        after = scrape(c)
        assert moved(before, after, "weightcache_digest_mismatches_total", stage="ingest") == 1
        assert moved(before, after, "weightcache_digest_mismatches_total", stage="read") == 0
        assert moved(before, after, "weightcache_origin_fetches_total", result="integrity") == 1
        assert moved(before, after, "weightcache_origin_fetches_total", result="ok") == 0
        assert after.get("weightcache_bytes", state="committed") == 0
        assert after.get("weightcache_pipelines", state="failed") == 1


def test_a_507_counts_once_and_fetches_nothing(tmp_path: Path) -> None:
    big = tmp_path / "models" / "big"
    big.mkdir(parents=True)
    with open(big / "model.safetensors", "wb") as handle:
        handle.truncate(12 * MiB)  # sparse: the node must refuse it before reading a byte
    with running_node(
        data_dir=tmp_path / "data", capacity="8MiB", local_roots=[tmp_path / "models"]
    ) as node, node.client() as c:
        before = scrape(c)
        answer = _register(c, "big", f"file://{big}")
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "insufficient_storage"
        after = scrape(c)
        assert moved(before, after, "weightcache_insufficient_storage_total") == 1
        assert moved(before, after, "weightcache_origin_bytes_total") == 0
        assert moved(before, after, "weightcache_cache_requests_total", result="miss") == 0
        assert after.get("weightcache_bytes", state="reserved") == 0


def test_a_reported_load_feeds_the_cold_start_histograms(tmp_path: Path) -> None:
    _local_model(tmp_path / "models" / "tiny")
    with running_node(
        data_dir=tmp_path / "data", capacity="64MiB", local_roots=[tmp_path / "models"]
    ) as node, node.client() as c:
        assert _register(c, "tiny", f"file://{tmp_path / 'models' / 'tiny'}").status_code == 202
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        before = scrape(c)
        result = load("tiny", url=node.url, verify=True)
        loaded = scrape(c)
        # the load itself: what the replica read is what the node served
        served = moved(before, loaded, "weightcache_bytes_served_total")
        assert served == result.report.stream.bytes_read
        assert moved(before, loaded, "weightcache_loads_total") == 0  # not reported yet

        stages = {
            "lease": 0.004,
            "manifest": 0.02,
            "connect": 0.003,
            "stream": 0.3,
            "verify": 0.07,
            "total": 0.4,
        }
        body = {"bytes": result.report.bytes, "stages": stages, "gbps": 12.5, "device": "cpu"}
        answer = c.post("/v1/pipelines/tiny/loads", json=body)
        assert answer.status_code == 202, answer.text
        after = scrape(c)
        assert moved(loaded, after, "weightcache_loads_total") == 1
        for stage, seconds in stages.items():
            name = "weightcache_cold_start_stage_seconds"
            assert moved(loaded, after, f"{name}_count", stage=stage) == 1
            assert moved(loaded, after, f"{name}_sum", stage=stage) == pytest.approx(seconds)
        assert moved(loaded, after, "weightcache_cold_start_stage_seconds_bucket",
                     stage="stream", le="0.25") == 0
        assert moved(loaded, after, "weightcache_cold_start_stage_seconds_bucket",
                     stage="stream", le="0.5") == 1
        name = "weightcache_load_throughput_bytes_per_second"
        assert moved(loaded, after, f"{name}_count") == 1
        assert moved(loaded, after, f"{name}_sum") == 12.5e9
        assert moved(loaded, after, f"{name}_bucket", le="1e+10") == 0
        assert moved(loaded, after, f"{name}_bucket", le="2e+10") == 1

        history = c.get("/v1/pipelines/tiny/loads").json()["loads"]
        assert [h["stages"] for h in history] == [stages]
        # a refused report (another pipeline's name, a negative time) counts nothing
        other = {**body, "pipeline": "other"}
        assert c.post("/v1/pipelines/tiny/loads", json=other).status_code == 400
        bad = {**body, "stages": {**stages, "stream": -1}}
        assert c.post("/v1/pipelines/tiny/loads", json=bad).status_code == 422
        assert c.post("/v1/pipelines/missing/loads", json=body).status_code == 404
        assert moved(after, scrape(c), "weightcache_loads_total") == 0


def test_the_grafana_dashboard_uses_only_metrics_a_node_exports(tmp_path: Path) -> None:
    from api import create_app
    from cache_node.settings import NodeSettings

    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count")}
    app = create_app(NodeSettings(data_dir=tmp_path))  # its collectors too (the data plane's)
    exported = {
        family.name + suffix
        for family in app.state.node.metrics.registry.collect()
        for suffix in suffixes[family.type]
    }
    app.state.node.meta.close()
    dashboard = json.loads(
        (Path(__file__).resolve().parent.parent / "infra" / "grafana-dashboard.json").read_text()
    )
    used = {
        name
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in re.findall(r"weightcache_[a-z_]+", target["expr"])
    }
    assert used, "the dashboard queries nothing"
    assert used <= exported, used - exported
    # every I10 counter has a panel
    for name in (
        "weightcache_origin_fetches_total",
        "weightcache_coalesced_waiters_total",
        "weightcache_digest_mismatches_total",
        "weightcache_insufficient_storage_total",
        "weightcache_evictions_total",
        "weightcache_bytes",
        "weightcache_cold_start_stage_seconds_bucket",
    ):
        assert name in used, name
