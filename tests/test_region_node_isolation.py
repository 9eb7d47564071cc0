"""Isolation in a region (I7): peers authenticate as nodes, never as tenants, and a tenant's
token reads nothing of another tenant on any node of the region."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import (
    get,
    local_model,
    local_spec,
    peer_headers,
    region_nodes,
    wait_state,
)

TOKENS = {"tok-a": "team-a", "tok-b": "team-b", "tok-ops": "admin"}


def test_a_tenants_token_reads_nothing_of_another_tenant_on_any_node(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    weights = local_model(tmp_path, 256 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    with region_nodes(redis_server.url, tmp_path, 3, tokens_file=tokens) as (_, nodes):
        with nodes[0].client("tok-a") as c:
            assert c.put("/v1/pipelines/p", json=local_spec(tmp_path)
            ).status_code == 202
        for node in nodes:  # team-a's pipeline is on every node, as team-a's
            wait_state(node, "p", "warm", token="tok-a")
        for node in nodes:
            blob = f"{node.url}/v1/blobs/{sha}"
            assert get(blob, headers={"Authorization": "Bearer tok-a"}).content == weights
            assert get(blob, headers={"Authorization": "Bearer tok-b"}).status_code == 404
            assert get(blob).status_code == 401
            with node.client("tok-b") as c:
                assert c.get("/v1/pipelines/p").status_code == 404
                assert c.get("/v1/pipelines/p/manifest").status_code == 404
                assert c.get("/v1/pipelines").json() == {"pipelines": []}
                assert c.get("/v1/region").json()["pipelines"] == []
            # a peer credential is no tenant token: nothing but blobs by digest
            assert get(f"{node.url}/v1/pipelines", headers=peer_headers()).status_code == 401
            assert get(f"{node.url}/v1/region", headers=peer_headers()).status_code == 401
            # and a tenant's token is no peer credential, whatever the scheme says
            tenant_as_peer = {"Authorization": "WeightcacheNode n0:tok-b"}
            assert get(blob, headers=tenant_as_peer).status_code == 401
            assert get(blob, headers=peer_headers()).content == weights
