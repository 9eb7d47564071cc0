"""Bytes from a peer are verified exactly as from any origin (I1): a peer that sends other
bytes is logged and skipped for the next peer, and nothing wrong is ever committed."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cache_node.region.placement import rank
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import CLOSED_ENDPOINT
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import (
    REGION,
    add_node,
    get,
    local_model,
    local_spec,
    plant_holder,
    region_nodes,
    wait_state,
)
from tests.fixtures.weights import safetensors_bytes


class _Liar(BaseHTTPRequestHandler):
    """A "peer" that answers every range with as many random bytes."""

    def do_GET(self) -> None:
        first, last = self.headers["Range"].removeprefix("bytes=").split("-")
        body = os.urandom(int(last) - int(first) + 1)
        self.send_response(206)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def lying_peer() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Liar)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_peer_sending_other_bytes_is_skipped_for_the_next_one(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    weights = local_model(tmp_path, 256 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    # a liar that every node asks before n0 (rendezvous order for this blob)
    liar_id = next(f"liar{i}" for i in range(1000) if rank(sha, {"n0", f"liar{i}"})[0] != "n0")
    with lying_peer() as liar_url, region_nodes(redis_server.url, tmp_path, 1) as (stack, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        wait_state(nodes[0], "p", "warm")
        client = redis_server.client()
        plant_holder(client, liar_id, liar_url, sha)
        client.close()

        with caplog.at_level(logging.WARNING, logger="weightcache.events"):
            late = add_node(stack, redis_server.url, tmp_path, 1)
            wait_state(late, "p", "warm")
        assert get(f"{late.url}/v1/blobs/{sha}").content == weights
        metrics = late.node.metrics
        assert metrics.region_fills.labels("peer_failed")._value.get() >= 1
        assert metrics.region_fills.labels("peer")._value.get() >= 1
        assert metrics.origin_bytes._value.get() == 0
        assert metrics.digest_mismatches.labels("ingest")._value.get() >= 1
        assert any("region.peer_fill_failed" in r.getMessage() for r in caplog.records)


def test_a_peer_whose_data_plane_cannot_be_reached_fills_from_its_api(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    weights = local_model(tmp_path, 256 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    # n0 advertises a data plane no node reaches (as a compose file publishes it on the host)
    with region_nodes(redis_server.url, tmp_path, 1, data_url=CLOSED_ENDPOINT) as (stack, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        wait_state(nodes[0], "p", "warm")
        late = add_node(stack, redis_server.url, tmp_path, 1)
        wait_state(late, "p", "warm")
        assert get(f"{late.url}/v1/blobs/{sha}").content == weights
        metrics = late.node.metrics
        assert metrics.region_fills.labels("peer_failed")._value.get() >= 1
        assert metrics.region_fills.labels("peer")._value.get() >= 1
        assert metrics.origin_bytes._value.get() == 0


def test_a_peer_fill_is_checked_against_the_origins_own_digest_not_only_the_regions_map(
    tmp_path: Path, redis_server: RedisServer, hf_hub: FixtureHub
) -> None:
    # Small files on the hub are plain git objects: the hub declares their git sha1, no sha256.
    # A node (buggy or hostile) maps config.json's object to another blob of the same size in
    # Redis; a node filling from its peers must not take those bytes for config.json.
    config, other = b'{"model_type": "llama", "a": 1}', b'{"model_type": "llama", "b": 2}'
    assert len(config) == len(other)
    hf_hub.add_repo("acme/m", {"config.json": config, "generation_config.json": other,
                               "model.safetensors": safetensors_bytes(64 * 1024)})
    prefix = f"weightcache:{{{REGION}}}:"
    hf = {"endpoint": hf_hub.endpoint}
    with region_nodes(redis_server.url, tmp_path, 1, hf=hf) as (stack, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json={"models": [{"name": "m", "source": "hf://acme/m"}]})
        wait_state(nodes[0], "p", "warm")
        client = redis_server.client()
        objects = client.hgetall(f"{prefix}objects")
        real, forged = hashlib.sha256(config).hexdigest(), hashlib.sha256(other).hexdigest()
        key = next(k for k, v in objects.items() if v == real)
        client.hset(f"{prefix}objects", key, forged)
        client.close()

        late = add_node(stack, redis_server.url, tmp_path, 1, hf=hf)
        wait_state(late, "p", "warm")
        with late.client() as c:
            files = {f["path"]: f["blob"] for f in c.get("/v1/pipelines/p/files").json()["files"]}
        assert files["config.json"] == real
        assert get(f"{late.url}/v1/blobs/{real}").content == config
        assert late.node.metrics.region_fills.labels("peer_failed")._value.get() >= 1


def test_a_node_record_with_an_unusable_url_is_left_out_of_manifests(
    tmp_path: Path, redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # a node that advertised "host:port" (no scheme): replicas could not use it, and would be
    # sent their token there; the manifest names the usable holders only, and says so
    weights = local_model(tmp_path, 64 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    with region_nodes(redis_server.url, tmp_path, 1) as (_, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        wait_state(nodes[0], "p", "warm")
        client = redis_server.client()
        plant_holder(client, "bad", "node-bad:8470", sha, px=60_000)
        client.close()
        with caplog.at_level(logging.WARNING, logger="weightcache.events"), \
                nodes[0].client() as c:
            blobs = c.get("/v1/pipelines/p/manifest").json()["blobs"]
        assert [b["nodes"] for b in blobs] == [[nodes[0].url]]
        assert any("region.bad_node_url" in r.getMessage() for r in caplog.records)
