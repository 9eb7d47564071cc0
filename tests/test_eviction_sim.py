"""The eviction simulator on a tiny trace, so the benchmark cannot rot."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    # The fixture loads the script from its path at run time; its types come from the same file.
    from benchmarks.eviction_sim import Result

SIM_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "eviction_sim.py"


@pytest.fixture(scope="module")
def sim() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eviction_sim", SIM_PATH)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eviction_sim"] = module  # dataclasses resolve their module by name
    spec.loader.exec_module(module)
    return module


def _run(sim: ModuleType, policy: str, *, pct: int) -> Result:
    catalogue = sim.make_catalogue(seed=3, pipelines=20)
    trace = sim.make_trace(
        sim.TraceSpec("tiny", zipf_s=1.0, starts_per_day=80, bursts_per_day=2, days=3, seed=5),
        pipelines=20,
    )
    result: Result = sim.simulate(
        catalogue,
        trace,
        capacity=catalogue.unique_bytes * pct // 100,
        evictor=sim.POLICIES[policy](catalogue),
        result=sim.Result("tiny", pct, policy),
    )
    return result


def test_catalogue_and_trace_are_deterministic_and_in_range(sim: ModuleType) -> None:
    catalogue = sim.make_catalogue(seed=3, pipelines=20)
    assert catalogue == sim.make_catalogue(seed=3, pipelines=20)
    sizes = [sum(blobs.values()) for blobs in catalogue.blobs]
    assert all(1 * sim.GB <= s <= 140 * sim.GB for s in sizes)
    spec = sim.TraceSpec("t", zipf_s=1.2, starts_per_day=50, days=2, seed=1)
    trace = sim.make_trace(spec, pipelines=20)
    assert trace == sim.make_trace(spec, pipelines=20)
    assert trace == sorted(trace)
    assert all(0 <= t < 2 * sim.DAY for t, _ in trace)


@pytest.mark.parametrize("policy", ["lru", "policy", "policy+trim", "policy-lru-order", "gdsf"])
def test_every_policy_runs_and_accounts(sim: ModuleType, policy: str) -> None:
    result = _run(sim, policy, pct=25)
    assert result.requests > 100
    assert 0 < result.hits < result.requests
    assert result.origin_bytes > 0
    assert result.evictions > 0


def test_hot_window_tiers_do_not_reorder_lru(sim: ModuleType) -> None:
    # A recency threshold cannot reorder a recency order: the policy in LRU mode is LRU.
    lru, tiered = _run(sim, "lru", pct=25), _run(sim, "policy-lru-order", pct=25)
    assert (lru.hits, lru.origin_bytes) == (tiered.hits, tiered.origin_bytes)


def test_main_writes_the_table_and_json(
    sim: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        sim, "TRACES", (sim.TraceSpec("tiny", zipf_s=1.0, starts_per_day=40, days=2, seed=2),)
    )
    assert sim.main(["--workers", "1", "--out", str(tmp_path), "--capacities", "25"]) == 0
    table = (tmp_path / "eviction_sim.md").read_text()
    assert "| tiny | 25% | lru |" in table
    assert "| tiny | 25% | policy |" in table
    payload = json.loads((tmp_path / "eviction_sim.json").read_text())
    assert {r["policy"] for r in payload["results"]} == set(sim.POLICIES)
