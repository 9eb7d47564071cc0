"""Three cache nodes of one region on loopback, a real redis-server, SeaweedFS behind a
byte-counting proxy: the origin pays once per region, a later node fills from peers, the
manifest lists each blob's holders, and ``GET /v1/region`` shows the region."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from api.schema import CaptureKey
from cache_node.region.placement import rank
from clients.cli import main
from clients.seaweed import SeaweedServer
from loader.captures import CaptureClient, CapturePayload
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import (
    add_node,
    get,
    local_model,
    local_spec,
    peer_headers,
    region_nodes,
    until,
    wait_state,
)
from tests.fixtures.weights import safetensors_bytes

MiB = 1024 * 1024


def _s3(proxy: CountingProxy, seaweed: SeaweedServer) -> dict[str, Any]:
    return {
        "endpoint_url": proxy.endpoint_url,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
    }


def _upload(seaweed: SeaweedServer, bucket: str) -> dict[str, bytes]:
    files = {
        "model.safetensors": safetensors_bytes(3 * MiB),
        "config.json": b'{"model_type": "x"}',
    }
    for name, data in files.items():
        seaweed.put(bucket, f"m/{name}", data)
    sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items())
    seaweed.put(bucket, "m/SHA256SUMS", sums.encode())
    return files


def _upload_capture(url: str) -> None:
    with CaptureClient(url, "p", token=None) as captures, httpx.Client(base_url=url) as http:
        snapshot = http.get("/v1/pipelines/p/manifest").json()["snapshots"]["m"]
        key = CaptureKey(kind="weights", model="m", engine="vllm", engine_version="0.32.0",
                         tp_size=1, rank=0, pp_size=1, pp_rank=0, dtype="float32",
                         quantization="none", device="cpu-x86_64-avx2", snapshot=snapshot,
                         settings="5" * 64)
        captures.upload_payload(key, CapturePayload.build({"w": torch.ones(8, 8)},
                                                          stage="loaded"))
        assert http.get("/v1/pipelines/p").json()["captures"][0]["key"] == key.model_dump(
            mode="json")


def test_registering_on_one_node_warms_the_region_with_one_origin_pull_and_a_later_node_fills_from_peers(  # noqa: E501
    tmp_path: Path,
    redis_server: RedisServer,
    seaweed: SeaweedServer,
    bucket: str,
    proxy: CountingProxy,
    capsys: pytest.CaptureFixture[str],
) -> None:
    files = _upload(seaweed, bucket)
    proxy.reset_counts()
    s3 = _s3(proxy, seaweed)
    with region_nodes(redis_server.url, tmp_path, 2, s3=s3) as (stack, nodes):
        with nodes[0].client() as c:
            assert c.put("/v1/pipelines/p", json={
                "models": [{"name": "m", "source": f"s3://{bucket}/m"}]}).status_code == 202
        for node in nodes:  # the catalogue registers it on the other node, which warms too
            wait_state(node, "p", "warm")
        for name, data in files.items():
            assert proxy.bytes_sent(f"/{bucket}/m/{name}") == len(data), name

        # a node that joins later fills its share from its peers: 0 origin bytes
        proxy.reset_counts()
        late = add_node(stack, redis_server.url, tmp_path, 2, s3=s3)
        wait_state(late, "p", "warm")
        for name in files:
            assert proxy.bytes_sent(f"/{bucket}/m/{name}") == 0, name
        assert late.node.metrics.peer_bytes._value.get() >= sum(map(len, files.values()))
        nodes.append(late)

        # every node's manifest lists every live holder, in rendezvous order
        urls = {f"n{i}": node.url for i, node in enumerate(nodes)}
        for node in nodes:
            with node.client() as c:
                def holders_listed(c: Any = c) -> bool:
                    blobs = c.get("/v1/pipelines/p/manifest").json()["blobs"]
                    return all(len(b["nodes"]) == 3 for b in blobs)

                until(holders_listed, what="three holders in the manifest")
                for blob in c.get("/v1/pipelines/p/manifest").json()["blobs"]:
                    assert blob["nodes"] == [urls[n] for n in rank(blob["sha256"], urls)]

        with nodes[1].client() as c:
            region = c.get("/v1/region").json()
        assert region["region"] == "r1"
        assert sorted(n["node_id"] for n in region["nodes"]) == ["n0", "n1", "n2"]
        assert all(n["capacity"] > 0 and n["used"] > 0 for n in region["nodes"])
        assert region["pipelines"] == [
            {"tenant": "default", "id": "p", "copies": 3, "nodes": ["n0", "n1", "n2"]}]
        # an engine shard set uploaded to one node is that node's extra: the others still
        # hold the pipeline whole
        _upload_capture(nodes[0].url)
        with nodes[1].client() as c:
            assert c.get("/v1/pipelines/p").json()["captures"] == []
        for node in nodes:
            with node.client() as c:
                assert c.get("/v1/region").json()["pipelines"][0]["copies"] == 3, node.url
        capsys.readouterr()
        assert main(["--url", nodes[1].url, "status"]) == 0
        shown = capsys.readouterr().out
        assert "region r1: 3 node(s)" in shown
        assert "p ×3 (n0 n1 n2)" in shown
        assert all(f"n{i}" in shown for i in range(3))

        # a node that leaves is no holder any more: manifests and the region drop it at once
        late.stop()
        with nodes[0].client() as c:
            def late_dropped(c: Any = c) -> bool:
                # (polled: on two loaded cores one holder lookup may time out, and a manifest
                # then names this node alone, as it should)
                blobs = c.get("/v1/pipelines/p/manifest").json()["blobs"]
                return all(late.url not in b["nodes"] and len(b["nodes"]) == 2 for b in blobs)

            until(late_dropped, timeout_s=5, what="the stopped node dropped from the manifest")
            assert c.get("/v1/region").json()["pipelines"][0]["copies"] == 2

        # a deletion on one node is a deletion in the region
        with nodes[1].client() as c:
            assert c.delete("/v1/pipelines/p").status_code == 204
        for node in nodes[:2]:
            wait_state(node, "p", None)


def test_peer_requests_need_the_region_secret_and_read_blobs_by_digest_only(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    weights = local_model(tmp_path, 256 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    with region_nodes(redis_server.url, tmp_path, 1) as (_, [node]):
        with node.client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        wait_state(node, "p", "warm")
        url = f"{node.url}/v1/blobs/{sha}"
        assert get(url, headers=peer_headers()).content == weights
        ranged = get(url, headers={**peer_headers(), "Range": "bytes=10-19"})
        assert ranged.status_code == 206
        assert ranged.content == weights[10:20]
        refused = get(url, headers=peer_headers(secret="x" * 40))
        assert refused.status_code == 401
        assert refused.json()["error"]["reason"] == "bad_secret"
        assert get(url, headers={"Authorization": "WeightcacheNode n9"}).status_code == 401
        assert get(f"{node.url}/v1/blobs/{'0' * 64}", headers=peer_headers()).status_code == 404


def test_a_leader_that_stops_mid_fill_hands_the_flight_to_another_node(
    tmp_path: Path,
    redis_server: RedisServer,
    seaweed: SeaweedServer,
    bucket: str,
    proxy: CountingProxy,
) -> None:
    files = _upload(seaweed, bucket)
    proxy.add_fault(Fault(match="model.safetensors", times=None, delay_s=1.5))
    client = redis_server.client()
    with region_nodes(redis_server.url, tmp_path, 2, s3=_s3(proxy, seaweed)) as (_, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json={
                "models": [{"name": "m", "source": f"s3://{bucket}/m"}]})

        def leader() -> str | None:
            for key in client.scan_iter(match="weightcache:{r1}:lease:*"):
                value = client.get(key)
                if value:
                    return str(value).split(":", 2)[2]
            return None

        until(lambda: leader() is not None, what="a flight's leader")
        holder = leader()
        stopped, survivor = (nodes[0], nodes[1]) if holder == "n0" else (nodes[1], nodes[0])
        stopped.stop()  # its lease is released, not left to expire: the other leads at once
        wait_state(survivor, "p", "warm", timeout_s=20)
        with survivor.client() as c:
            blob = c.get("/v1/pipelines/p/manifest").json()["blobs"][0]
        assert blob["nodes"] == [survivor.url]
        # what only the stopped node held comes from the origin again: once more, no more
        for name, data in files.items():
            assert proxy.bytes_sent(f"/{bucket}/m/{name}") <= 2 * len(data), name
    client.close()
