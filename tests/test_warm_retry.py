"""Transient failures heal by themselves; permanent ones wait for a person and say so."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import pytest

from api.schema import ErrorInfo
from cache_node.errors import IntegrityError, OriginError, OriginUnauthorized
from cache_node.metadata import DiskcacheKeyValue
from cache_node.registry import Registry
from cache_node.retry import backoff_s, failure_info
from cache_node.settings import RetrySettings
from clients.cli import main as cli_main
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import CLOSED_ENDPOINT, running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes

CONFIG = b'{"model_type": "llama"}'


def _node(tmp_path: Path, hub: FixtureHub, **retry: Any) -> Any:
    return running_node(
        data_dir=tmp_path / "data",
        capacity="1GiB",
        hf={"endpoint": hub.endpoint},
        # one GET per warm, so that every 503 fails a warm (the fetcher's own retries are
        # covered elsewhere); the node's retries then make up the difference
        fetch={"part_size": "1MiB", "max_attempts": 1, "backoff_base_s": 0.01},
        retry={"base_s": 0.5, "cap_s": 1.0, **retry},
    )


def _scrape(client: Any, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{wanted}}} "):
            return float(line.split()[-1])
    return 0.0


def test_a_pipeline_failing_three_times_with_503_warms_on_its_own(
    tmp_path: Path, hf_hub: FixtureHub, caplog: pytest.LogCaptureFixture
) -> None:
    weights = "model-fault-503x3.safetensors"
    hf_hub.add_repo("org/flaky", {weights: safetensors_bytes(4096), "config.json": CONFIG})
    caplog.set_level(logging.INFO, logger="weightcache.events")
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        c.put("/v1/pipelines/f", json={"models": [{"name": "m", "source": "hf://org/flaky"}]})
        failed = wait_for_state(c, "f", {"failed", "warm"})
        assert failed["state"] == "failed"  # what the status promises ...
        assert failed["error"]["code"] == "origin_error"
        assert failed["error"]["retry_at"] is not None
        assert failed["error"]["attempts"] >= 1
        # ... happens, with no call from anyone: only status reads from here on
        assert wait_for_state(c, "f", {"warm"})["error"] is None
        assert hf_hub.requests(weights) == 4  # 3 × 503, then the good one
        assert _scrape(c, "weightcache_warm_retries_total", event="scheduled") == 3
        assert _scrape(c, "weightcache_warm_retries_total", event="started") == 3
    scheduled = [r for r in caplog.records if r.getMessage() == "warm.retry_scheduled"]
    assert [getattr(r, "event_fields", {})["attempts"] for r in scheduled] == [1, 2, 3]


def test_permanent_failures_are_never_retried(tmp_path: Path, hf_hub: FixtureHub) -> None:
    hf_hub.add_repo("org/garbage", {"model.safetensors": b"\x00" * 4096, "config.json": CONFIG})
    hf_hub.add_repo("org/gated", {"model.safetensors": safetensors_bytes(64)}, gated=True,
                    token="hf_secret")
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        for name in ("garbage", "gated"):
            c.put(f"/v1/pipelines/{name}",
                  json={"models": [{"name": "m", "source": f"hf://org/{name}"}]})
        statuses = {n: wait_for_state(c, n, {"failed", "warm"}) for n in ("garbage", "gated")}
        assert statuses["garbage"]["error"]["code"] == "invalid_checkpoint"
        assert statuses["gated"]["error"]["code"] == "unauthorized"
        for status in statuses.values():
            assert status["state"] == "failed"
            assert status["error"]["retry_at"] is None
            assert status["error"]["action"].startswith("waits for a person")
        origin_requests = len(hf_hub.log)
        # Several retry periods (0.5 s doubling to 1 s) pass, and nobody asks the origin again.
        time.sleep(3.0)
        assert len(hf_hub.log) == origin_requests
        assert c.get("/v1/pipelines/garbage").json()["error"]["attempts"] == 1
        assert _scrape(c, "weightcache_warm_retries_total", event="started") == 0


def test_a_due_retry_survives_a_restart(tmp_path: Path, hf_hub: FixtureHub) -> None:
    weights = "model-fault-503x1.safetensors"
    hf_hub.add_repo("org/once", {weights: safetensors_bytes(4096), "config.json": CONFIG})
    body = {"models": [{"name": "m", "source": "hf://org/once"}]}
    with _node(tmp_path, hf_hub, base_s=3600, cap_s=3600) as node, node.client() as c:
        c.put("/v1/pipelines/p", json=body)
        status = wait_for_state(c, "p", {"failed", "warm"})
        assert status["state"] == "failed"
        assert status["error"]["retry_at"] > time.time() + 3000
    # The node is down while its retry falls due (an hour passes: the record says so).
    meta = DiskcacheKeyValue(tmp_path / "data" / "meta")
    registry = Registry(meta)
    record = registry.get("default", "p")
    assert record is not None
    assert record.error is not None
    record.error = record.error.model_copy(update={"retry_at": time.time() - 1})
    registry.put(record)
    meta.close()
    with _node(tmp_path, hf_hub, base_s=3600, cap_s=3600) as node, node.client() as c:
        assert wait_for_state(c, "p", {"warm"})["error"] is None
        assert hf_hub.requests(weights) == 2


def test_weightcache_warm_rewarms_a_permanent_failure_by_hand(
    tmp_path: Path, hf_hub: FixtureHub, capsys: pytest.CaptureFixture[str]
) -> None:
    hf_hub.add_repo("org/fixed-later", {"config.json": CONFIG})
    with _node(tmp_path, hf_hub) as node, node.client() as c:
        c.put("/v1/pipelines/p",
              json={"models": [{"name": "m", "source": "hf://org/fixed-later"}]})
        assert wait_for_state(c, "p", {"failed", "warm"})["error"]["code"] == "no_weights"
        hf_hub.add_repo("org/fixed-later",
                        {"model.safetensors": safetensors_bytes(256), "config.json": CONFIG})
        assert cli_main(["--url", node.url, "warm", "p", "--wait"]) == 0
        assert "warm" in capsys.readouterr().out
        assert c.get("/v1/pipelines/p").json()["state"] == "warm"


def test_backoff_doubles_to_its_cap_and_honours_retry_after() -> None:
    settings = RetrySettings()  # the defaults: 30 s doubling to an hour
    assert [backoff_s(n, settings) for n in (1, 2, 3, 7, 8, 50)] == [
        30, 60, 120, 1920, 3600, 3600
    ]
    transient = OriginError("503", status=503, retryable=True, retry_after=500.0)
    info = failure_info(transient, failures=1, settings=settings, now=1000.0)
    assert info == ErrorInfo(code="origin_error", message="503", retry_at=1500.0, attempts=1,
                             action=info.action)
    for permanent in (
        OriginUnauthorized("gated", status=401),
        OriginError("412", status=412, retryable=False),
        IntegrityError("digest"),
    ):
        info = failure_info(permanent, failures=1, settings=settings, now=1000.0)
        assert info.retry_at is None
        assert info.action
        assert "person" in info.action


def test_an_unreachable_origin_is_retried_again_and_again(tmp_path: Path) -> None:
    with running_node(
        data_dir=tmp_path / "data",
        hf={"endpoint": CLOSED_ENDPOINT},
        fetch={"max_attempts": 1},
        retry={"base_s": 0.2, "cap_s": 0.2},
    ) as node, node.client() as c:
        c.put("/v1/pipelines/p", json={"models": [{"name": "m", "source": "hf://org/gone"}]})
        deadline = time.monotonic() + 60
        while True:
            error = c.get("/v1/pipelines/p").json()["error"]
            if error is not None and error["attempts"] >= 3:
                break
            assert time.monotonic() < deadline, error
            time.sleep(0.05)
        assert error["code"] == "origin_error"
        assert "cannot reach" in error["message"]
        assert error["retry_at"] is not None
