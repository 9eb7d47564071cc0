"""What the node tells an operator: a retry time only when a retry will happen, and fills in
flight apart from the partial files a crash or a failed transfer left behind.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes, write_weights

KiB = 1024
MiB = 1024 * KiB
TOKENS = {"tok-a": "team-a", "tok-b": "team-b", "tok-ops": "admin"}
CONFIG = b'{"model_type": "llama"}'


def _tokens(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(TOKENS))
    return path


def _local(root: Path, name: str, nbytes: int) -> dict[str, Any]:
    write_weights(root / name, nbytes=nbytes)
    (root / name / "config.json").write_bytes(CONFIG)
    return {"models": [{"name": "m", "source": f"file://{root / name}"}]}


def _metric(client: httpx.Client, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name} is not exported")


def _until(condition: Any, what: str, *, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


# ---------------------------------------------------------------------- retry time


def test_a_retry_time_is_shown_only_when_a_retry_will_happen(tmp_path: Path) -> None:
    with FixtureHub() as hub:
        hub.add_repo("org/down", {"model-fault-500.safetensors": safetensors_bytes(4 * KiB),
                                  "config.json": CONFIG})

        def node(*, retries: bool) -> Any:
            return running_node(
                data_dir=tmp_path / "data", capacity="64MiB", hf={"endpoint": hub.endpoint},
                fetch={"max_attempts": 1},
                retry={"enabled": retries, "base_s": 600},
            )

        with node(retries=True) as first, first.client() as c:
            body = {"models": [{"name": "m", "source": "hf://org/down"}]}
            c.put("/v1/pipelines/p", json=body)
            failed = wait_for_state(c, "p", {"failed", "warm"})
            assert failed["state"] == "failed"
            assert failed["error"]["retry_at"] is not None  # a transient failure: scheduled

        # restarted with retries off: the record still holds its retry_at, nothing will act on
        # it, so the status promises nothing and says how to try again
        with node(retries=False) as second, second.client() as c:
            error = c.get("/v1/pipelines/p").json()["error"]
            assert error["code"] == failed["error"]["code"]
            assert error["retry_at"] is None
            assert "automatic retries are off" in error["action"]
            listed = c.get("/v1/pipelines").json()["pipelines"][0]["error"]
            assert listed == error

        with node(retries=True) as third, third.client() as c:
            retry_at = c.get("/v1/pipelines/p").json()["error"]["retry_at"]
            assert retry_at == pytest.approx(failed["error"]["retry_at"])


# ---------------------------------------------------------------------- fills in flight


def test_fills_in_flight_are_not_leftover_partials(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "tmp").mkdir(parents=True)
    leftover = data / "tmp" / f"{'ab' * 32}.partial"  # a transfer a crash left, resumable
    leftover.write_bytes(b"\1" * 96 * KiB)
    with FixtureHub(stall_s=2.0) as hub:
        hub.add_repo("org/slow", {"model-fault-stall.safetensors": safetensors_bytes(6 * MiB),
                                  "config.json": CONFIG})
        with running_node(
            data_dir=data, capacity="64MiB", hf={"endpoint": hub.endpoint}
        ) as node, node.client() as c:
            info = c.get("/v1/node").json()
            assert info["temp"] == 96 * KiB  # the leftover: idle, counted as temp ...
            assert info["in_flight"] == 0  # ... and not as a fill in flight
            assert _metric(c, "weightcache_fill_bytes_in_flight") == 0

            c.put("/v1/pipelines/p", json={"models": [{"name": "m", "source": "hf://org/slow"}]})
            # the fill stalls halfway for 2 s: what it wrote so far is in flight
            _until(lambda: c.get("/v1/node").json()["in_flight"] > 0, "no fill in flight")
            during = c.get("/v1/node").json()
            assert 0 < during["in_flight"] <= during["reserved"]
            assert during["temp"] == 96 * KiB
            assert _metric(c, "weightcache_fill_bytes_in_flight") > 0

            assert wait_for_state(c, "p", {"warm", "failed"})["state"] == "warm"
            after = c.get("/v1/node").json()
            assert after["in_flight"] == 0
            assert after["temp"] == 96 * KiB
