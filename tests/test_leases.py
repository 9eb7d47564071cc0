"""Leases: held, renewed, released, and gone once they expire unrenewed."""

from __future__ import annotations

import time
from pathlib import Path

from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.weights import write_weights


def test_lease_lifecycle_and_expiry(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "config.json").write_text("{}")
    write_weights(source)
    with running_node(data_dir=tmp_path / "data", lease_ttl_s=1.0) as node, node.client() as c:
        c.put("/v1/pipelines/p", json={"models": [{"name": "m", "source": f"file://{source}"}]})
        wait_for_state(c, "p", {"warm"})
        lease = c.post("/v1/pipelines/p/leases").json()
        assert c.get("/v1/pipelines/p").json()["active_leases"] == 1
        assert c.post("/v1/pipelines/p/evict").status_code == 409  # a loading replica holds it

        time.sleep(0.6)
        renewed = c.post(f"/v1/leases/{lease['lease_id']}").json()
        assert renewed["expires_at"] > lease["expires_at"]
        time.sleep(0.6)  # past the first expiry, within the renewed one
        assert c.get("/v1/pipelines/p").json()["active_leases"] == 1

        second = c.post("/v1/pipelines/p/leases").json()
        assert c.delete(f"/v1/leases/{second['lease_id']}").status_code == 204
        assert c.delete(f"/v1/leases/{second['lease_id']}").status_code == 404

        deadline = time.monotonic() + 10
        while c.get("/v1/pipelines/p").json()["active_leases"]:
            assert time.monotonic() < deadline, "an unrenewed lease never expired"
            time.sleep(0.1)
        assert c.post("/v1/pipelines/p/evict").status_code == 202
