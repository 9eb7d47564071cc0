"""What an operator does to one pipeline, over HTTP: pin and unpin (in place), and what the
node says back: a retry time only when a retry will happen, and fills in flight apart from
leftover partial files.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.metrics import metric_value
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


def _until(condition: Any, what: str, *, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.02)


# ---------------------------------------------------------------------- pin and unpin


def test_pin_and_unpin_are_per_tenant_in_place_and_hold_off_eviction(tmp_path: Path) -> None:
    models = tmp_path / "models"
    with running_node(
        data_dir=tmp_path / "data", capacity="3MiB", tokens_file=_tokens(tmp_path),
        local_roots=[models],
    ) as node, node.client("tok-a") as a, node.client("tok-b") as b:
        assert a.put("/v1/pipelines/big", json=_local(models, "big", 2 * MiB)).status_code == 202
        warm = wait_for_state(a, "big", {"warm", "failed"})
        assert warm["state"] == "warm"
        assert warm["pinned"] is False

        # anyone else: 401 without a token, 404 (the same as a missing pipeline) for team-b
        assert httpx.post(f"{node.url}/v1/pipelines/big/pin").status_code == 401
        refused = b.post("/v1/pipelines/big/pin")
        assert refused.status_code == 404
        assert refused.json()["error"] == {
            "code": "not_found", "message": "no pipeline 'big'", "pipeline": "big"
        }
        assert a.get("/v1/pipelines/big").json()["pinned"] is False

        pinned = a.post("/v1/pipelines/big/pin")
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["pinned"] is True
        assert pinned.json()["state"] == "warm"  # in place: not a re-registration
        assert "pending" not in pinned.json() or pinned.json()["pending"] is None
        assert a.post("/v1/pipelines/big/pin").json()["pinned"] is True  # idempotent

        # pinned: another pipeline that needs its space is refused rather than evict it
        refused = a.put("/v1/pipelines/next", json=_local(models, "next", 2 * MiB))
        assert refused.status_code == 507, refused.text
        assert a.get("/v1/pipelines/big").json()["state"] == "warm"

        assert a.post("/v1/pipelines/big/unpin").json()["pinned"] is False
        assert a.post("/v1/pipelines/next/warm").status_code == 202
        assert wait_for_state(a, "next", {"warm", "failed"})["state"] == "warm"
        assert a.get("/v1/pipelines/big").json()["state"] == "evicted"

        # admin addresses the tenant's pipeline with ?tenant=
        with node.client("tok-ops") as ops:
            answer = ops.post("/v1/pipelines/next/pin", params={"tenant": "team-a"})
            assert answer.status_code == 200, answer.text
        assert a.get("/v1/pipelines/next").json()["pinned"] is True


def test_a_pin_while_the_pipeline_fills_survives_the_warm_jobs_saves(tmp_path: Path) -> None:
    with FixtureHub(stall_s=1.0) as hub:
        hub.add_repo("org/slow", {
            **{f"w-{i}-fault-stall.safetensors": safetensors_bytes(64 * KiB) for i in range(6)},
            "config.json": CONFIG,
        })
        with running_node(
            data_dir=tmp_path / "data", capacity="64MiB", hf={"endpoint": hub.endpoint},
        ) as node, node.client() as c:
            body = {"models": [{"name": "m", "source": "hf://org/slow"}]}
            assert c.put("/v1/pipelines/p", json=body).status_code == 202
            _until(lambda: c.get("/v1/pipelines/p").json()["progress"] > 0, "p never moved")
            assert c.post("/v1/pipelines/p/pin").json()["pinned"] is True
            warm = wait_for_state(c, "p", {"warm", "failed"})
            assert warm["state"] == "warm", warm
            assert warm["pinned"] is True  # the job's own copy said unpinned

            # a re-registration filling beside the warm version takes the pin along
            hub.add_repo("org/slow", {
                "w-new-fault-stall.safetensors": safetensors_bytes(64 * KiB),
                "config.json": CONFIG,
            })
            assert c.post("/v1/pipelines/p/unpin").json()["pinned"] is False
            body["models"][0]["revision"] = "main"  # a new spec: it fills beside
            assert c.put("/v1/pipelines/p", json=body).status_code == 202
            assert c.get("/v1/pipelines/p").json()["pending"] is not None
            assert c.post("/v1/pipelines/p/pin").json()["pinned"] is True
            _until(lambda: c.get("/v1/pipelines/p").json().get("pending") is None,
                   "the re-registration never took over")
            swapped = c.get("/v1/pipelines/p").json()
            assert swapped["models"][0]["files"] == 2  # the new commit's files
            assert swapped["pinned"] is True


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
    with FixtureHub(stall_s=4.0) as hub:
        hub.add_repo("org/slow", {"model-fault-stall.safetensors": safetensors_bytes(6 * MiB),
                                  "config.json": CONFIG})
        with running_node(
            data_dir=data, capacity="64MiB", hf={"endpoint": hub.endpoint}
        ) as node, node.client() as c:
            info = c.get("/v1/node").json()
            assert info["temp"] == 96 * KiB  # the leftover: idle, counted as temp ...
            assert info["in_flight"] == 0  # ... and not as a fill in flight
            assert metric_value(c, "weightcache_fill_bytes_in_flight") == 0

            c.put("/v1/pipelines/p", json={"models": [{"name": "m", "source": "hf://org/slow"}]})
            # the fill stalls halfway for 4 s: what it wrote so far is in flight
            seen: list[dict[str, Any]] = []

            def in_flight() -> bool:
                seen.append(c.get("/v1/node").json())
                return bool(seen[-1]["in_flight"] > 0)

            _until(in_flight, "no fill in flight")
            during = seen[-1]  # the answer that saw it: a second one may come after the stall
            assert 0 < during["in_flight"] <= during["reserved"]
            assert during["temp"] == 96 * KiB
            _until(lambda: metric_value(c, "weightcache_fill_bytes_in_flight") > 0,
                   "the gauge never showed the fill in flight")

            assert wait_for_state(c, "p", {"warm", "failed"})["state"] == "warm"
            after = c.get("/v1/node").json()
            assert after["in_flight"] == 0
            assert after["temp"] == 96 * KiB
