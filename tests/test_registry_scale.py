"""What one tenant's requests cost does not grow with another tenant's pipelines and leases.

A real node (uvicorn, real HTTP) with a data-plane worker process. Costs are counted, not
timed: every metadata record the node reads (a counting hook on its key-value store) and, for
the data plane, the records its workers read (their shared-memory counters in ``/metrics``).
Tenant alpha's status, list, lease and blob requests (and 404s on both ports) cost the same
with one of beta's pipelines as with 300 pipelines and 500 leases. Leases are capped per tenant.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.data_plane import run_data_plane, stop_data_plane
from api.schema import ModelSpec, PipelineSpec
from cache_node.registry import FileEntry, ModelEntry, PipelineRecord
from tests.fixtures.node_server import RunningNode, free_port, running_node, wait_for_state
from tests.fixtures.weights import write_weights
from tests.test_metrics import Scrape

TOKENS = {"tok-a": "alpha", "tok-b": "beta", "tok-g": "gamma"}
LEASE_LIMIT = 3


@dataclass
class Setup:
    node: RunningNode
    data_url: str
    blob: str  # alpha's weights blob
    reads: list[int]  # metadata records read so far (one counter, mutable)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("scale")
    (root / "tokens.json").write_text(json.dumps(TOKENS))
    model = root / "model"
    model.mkdir()
    data = b"weights " * 1000
    (model / "weights.txt").write_bytes(data)
    write_weights(model)  # a pipeline is warm only with loadable weights
    port = free_port()
    with running_node(
        data_dir=root / "data",
        tokens_file=root / "tokens.json",
        local_roots=[root],
        data_url=f"http://127.0.0.1:{port}",
        limits={"leases_per_tenant": LEASE_LIMIT},
        eviction={"interval_s": 3600},  # no background pass reading records mid-count
    ) as node:
        with node.client("tok-a") as alpha:
            for name in ("a1", "a2"):
                body = {"models": [{"name": "m", "source": f"file://{model}"}]}
                assert alpha.put(f"/v1/pipelines/{name}", json=body).status_code == 202
                assert wait_for_state(alpha, name, {"warm", "failed"})["state"] == "warm"
        _seed(node, "beta", pipelines=1, leases=0)
        _seed(node, "gamma", pipelines=1, leases=0)
        reads = [0]
        meta = node.node.meta
        original_get = meta.get

        def counting_get(key: str) -> dict[str, Any] | None:
            reads[0] += 1
            return original_get(key)

        meta.get = counting_get  # type: ignore[method-assign]  # every reader shares this store
        workers = run_data_plane(node.settings, port=port, workers=1)
        try:
            yield Setup(node, f"http://127.0.0.1:{port}", hashlib.sha256(data).hexdigest(), reads)
        finally:
            stop_data_plane(workers)


def _seed(node: RunningNode, tenant: str, *, pipelines: int, leases: int) -> None:
    """Records straight into the registry: another tenant's bulk, without fetching anything."""
    registry = node.node.registry
    spec = PipelineSpec(models=[ModelSpec(name="m", source="file:///nowhere")])
    for i in range(pipelines):
        blob = hashlib.sha256(f"{tenant}{i}".encode()).hexdigest()
        registry.put(PipelineRecord(
            id=f"p{i}", tenant=tenant, spec=spec, state="evicted",
            models=[ModelEntry(name="m", source="file:///nowhere",
                               files=[FileEntry(path="w", size=1, blob=blob)])],
        ))
    for i in range(leases):
        registry.create_lease(tenant, f"p{i % max(1, pipelines)}", ttl_s=600)


def _costs(setup: Setup) -> dict[str, float]:
    """Records read by each of alpha's requests (API) and by data-plane 404s and hits."""
    costs: dict[str, float] = {}
    missing = "cd" * 32

    def measure(name: str, request: Callable[[], None]) -> None:
        before = setup.reads[0]
        request()
        costs[name] = setup.reads[0] - before

    with setup.node.client("tok-a") as alpha:

        def lease_and_release() -> None:
            lease = alpha.post("/v1/pipelines/a1/leases")
            assert lease.status_code == 201, lease.text
            assert alpha.delete(f"/v1/leases/{lease.json()['lease_id']}").status_code == 204

        measure("status", lambda: _ok(alpha.get("/v1/pipelines/a1")))
        measure("list", lambda: _ok(alpha.get("/v1/pipelines")))
        measure("lease", lease_and_release)
        measure("api blob", lambda: _ok(alpha.get(f"/v1/blobs/{setup.blob}")))
        measure("api 404", lambda: _missing(alpha.get(f"/v1/blobs/{missing}")))
        plane = Scrape(alpha.get("/metrics").text).get("weightcache_data_plane_meta_reads_total")
        headers = {"Authorization": "Bearer tok-a"}
        for _ in range(10):
            _missing(httpx.get(f"{setup.data_url}/v1/blobs/{missing}", headers=headers))
        _ok(httpx.get(f"{setup.data_url}/v1/blobs/{setup.blob}", headers=headers))
        after = Scrape(alpha.get("/metrics").text).get("weightcache_data_plane_meta_reads_total")
        costs["data plane 10×404 + 1 hit"] = after - plane
    return costs


def _ok(answer: httpx.Response) -> None:
    assert answer.status_code == 200, answer.text


def _missing(answer: httpx.Response) -> None:
    assert answer.status_code == 404, answer.text


def test_costs_do_not_grow_with_another_tenants_records(setup: Setup) -> None:
    small = _costs(setup)
    _seed(setup.node, "beta", pipelines=300, leases=500)
    large = _costs(setup)
    assert large == small
    assert small["data plane 10×404 + 1 hit"] <= 2 * 11  # a lookup is a read or two


def test_leases_are_capped_per_tenant(setup: Setup, tmp_path: Path) -> None:
    with setup.node.client("tok-a") as alpha, setup.node.client("tok-g") as gamma:
        held = [alpha.post("/v1/pipelines/a1/leases") for _ in range(LEASE_LIMIT)]
        try:
            assert [answer.status_code for answer in held] == [201] * LEASE_LIMIT
            refused = alpha.post("/v1/pipelines/a2/leases")
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_leases"
            assert int(refused.headers["retry-after"]) >= 1
            # Another tenant is not held back by alpha's leases.
            other = gamma.post("/v1/pipelines/p0/leases")
            assert other.status_code == 201
            assert gamma.delete(f"/v1/leases/{other.json()['lease_id']}").status_code == 204
            assert alpha.get("/v1/pipelines/a1").json()["active_leases"] == LEASE_LIMIT
        finally:
            for answer in held:
                if answer.status_code == 201:
                    alpha.delete(f"/v1/leases/{answer.json()['lease_id']}")
        again = alpha.post("/v1/pipelines/a2/leases")
        assert again.status_code == 201  # released leases free their places
        assert alpha.delete(f"/v1/leases/{again.json()['lease_id']}").status_code == 204
        assert alpha.get("/v1/pipelines/a1").json()["active_leases"] == 0
