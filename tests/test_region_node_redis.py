"""A region whose Redis goes away: the nodes keep serving what they hold and say
``region_unreachable`` on ``/readyz``; when Redis returns (restarted empty) they register
again: themselves, their blobs, the origin objects they committed, and their pipelines."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from clients.seaweed import SeaweedServer
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.node_server import RunningNode
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import (
    REGION,
    add_node,
    get,
    local_model,
    local_spec,
    region_nodes,
    state,
    until,
    wait_state,
)
from tests.fixtures.weights import safetensors_bytes


def test_restarting_redis_empty_nodes_keep_serving_and_register_again(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    weights = local_model(tmp_path, 512 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    prefix = f"weightcache:{{{REGION}}}:"
    with region_nodes(redis_server.url, tmp_path, 2) as (_, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        for node in nodes:
            wait_state(node, "p", "warm")
        for node in nodes:
            assert get(f"{node.url}/readyz").status_code == 200

        redis_server.stop()  # empty when it comes back
        for node in nodes:
            def unreachable(node: RunningNode = node) -> bool:
                answer = get(f"{node.url}/readyz")
                codes = [r["code"] for r in answer.json().get("reasons", [])]
                return answer.status_code == 503 and "region_unreachable" in codes

            until(unreachable, timeout_s=10, what="readyz region_unreachable")
            until(lambda node=node: "weightcache_region_reachable 0.0" in  # type: ignore[misc]
                  get(f"{node.url}/metrics").text, timeout_s=5, what="the gauge says so")
            # still serving what it holds
            assert get(f"{node.url}/v1/blobs/{sha}").content == weights
            with node.client() as c:
                assert c.get("/v1/pipelines/p/manifest").status_code == 200

        # registered while Redis is away: at once, on this node; the region's when it is back
        with nodes[0].client() as c:
            started = time.monotonic()
            assert c.put("/v1/pipelines/q", json=local_spec(tmp_path)).status_code == 202
            assert time.monotonic() - started < 1
        wait_state(nodes[0], "q", "warm")
        assert state(nodes[1], "q") is None

        redis_server.start()
        client = redis_server.client()

        def registered_again() -> bool:
            return (
                client.smembers(f"{prefix}nodes") == {"n0", "n1"}
                and client.smembers(f"{prefix}blob:{sha}") == {"n0", "n1"}
                and client.hexists(f"{prefix}pipelines", "default/p")
                and sha in client.hvals(f"{prefix}objects")
            )

        until(registered_again, timeout_s=10, what="nodes, blobs, objects and pipelines again")
        wait_state(nodes[1], "q", "warm")
        for node in nodes:
            ready = f"{node.url}/readyz"
            until(lambda ready=ready: get(ready).status_code == 200,  # type: ignore[misc]
                  timeout_s=10, what="ready again")
            with node.client() as c:
                blobs = c.get("/v1/pipelines/p/manifest").json()["blobs"]
            assert len(blobs[0]["nodes"]) == 2
            until(lambda node=node: "weightcache_region_reachable 1.0" in  # type: ignore[misc]
                  get(f"{node.url}/metrics").text, timeout_s=5, what="reachable again")
        client.close()


def test_a_leader_whose_lease_redis_lost_mid_fill_still_warms_its_pipeline(
    tmp_path: Path, redis_server: RedisServer, seaweed: SeaweedServer, bucket: str,
    proxy: CountingProxy,
) -> None:
    # Redis restarted empty (or flushed) while a node pulls from the origin as the region's
    # leader: its lease is gone. The pull goes on without the region, not into a failure that
    # waits for a person.
    weights = safetensors_bytes(3 * 1024 * 1024)
    seaweed.put(bucket, "m/model.safetensors", weights)
    seaweed.put(bucket, "m/SHA256SUMS",
                f"{hashlib.sha256(weights).hexdigest()}  model.safetensors\n".encode())
    proxy.add_fault(Fault(match="model.safetensors", times=None, delay_s=1.0))
    s3 = {"endpoint_url": proxy.endpoint_url, "access_key_id": seaweed.access_key,
          "secret_access_key": seaweed.secret_key}
    client = redis_server.client()
    try:
        with region_nodes(redis_server.url, tmp_path, 1, s3=s3) as (_, nodes):
            with nodes[0].client() as c:
                assert c.put("/v1/pipelines/p", json={
                    "models": [{"name": "m", "source": f"s3://{bucket}/m"}]}).status_code == 202
            until(lambda: any(client.scan_iter(match=f"weightcache:{{{REGION}}}:lease:*")),
                  what="the fill's lease")
            client.flushall()
            until(lambda: state(nodes[0], "p") in ("warm", "failed"), timeout_s=60,
                  what="the fill's end")
            assert state(nodes[0], "p") == "warm"
            metrics = get(f"{nodes[0].url}/metrics").text
            assert 'weightcache_region_fills_total{source="origin_without_region"} 1.0' in metrics
    finally:
        proxy.clear_faults()
        client.close()


def test_a_deletion_made_while_redis_is_away_survives_a_restart_of_its_node(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # Deleted on n0 while Redis is away, n0 restarted before Redis returns (empty): the
    # deletion still reaches the region, and n1's copy does not bring the pipeline back.
    local_model(tmp_path, 256 * 1024)
    with region_nodes(redis_server.url, tmp_path, 2) as (stack, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        for node in nodes:
            wait_state(node, "p", "warm")
        redis_server.stop()
        with nodes[0].client() as c:
            assert c.delete("/v1/pipelines/p").status_code == 204
        nodes[0].stop()
        restarted = add_node(stack, redis_server.url, tmp_path, 0)
        assert state(restarted, "p") is None
        redis_server.start()
        wait_state(nodes[1], "p", None, timeout_s=20)
        time.sleep(1.0)  # a few reconcile passes (0.5 s): nothing brings it back
        for node in (restarted, nodes[1]):
            assert state(node, "p") is None


def test_a_node_that_died_without_leaving_is_forgotten_as_a_holder(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # its membership expired, its blob locations did not: the live nodes drop them on their
    # own passes (not only when some node rejoins), so manifests stop naming it
    weights = local_model(tmp_path, 256 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    prefix = f"weightcache:{{{REGION}}}:"
    with region_nodes(redis_server.url, tmp_path, 1) as (_, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        wait_state(nodes[0], "p", "warm")
        client = redis_server.client()
        client.sadd(f"{prefix}holders", "ghost")
        client.sadd(f"{prefix}held:ghost", sha)
        client.sadd(f"{prefix}blob:{sha}", "ghost")
        until(lambda: "ghost" not in client.smembers(f"{prefix}blob:{sha}"), timeout_s=10,
              what="the dead node's locations dropped")
        assert not client.exists(f"{prefix}held:ghost")
        assert "ghost" not in client.smembers(f"{prefix}holders")
        assert client.smembers(f"{prefix}blob:{sha}") == {"n0"}
        client.close()


def test_a_deletion_a_down_node_missed_is_not_undone_by_a_redis_that_restarted_empty(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # n1 is down while p is deleted on n0; Redis then restarts empty (the tombstone is gone);
    # n1 comes back with its copy of p and writes it back. n0 remembers the deletion, which is
    # newer, and writes it over: p is gone on both.
    local_model(tmp_path, 256 * 1024)
    with region_nodes(redis_server.url, tmp_path, 2) as (stack, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        for node in nodes:
            wait_state(node, "p", "warm")
        nodes[1].stop()
        with nodes[0].client() as c:
            assert c.delete("/v1/pipelines/p").status_code == 204
        redis_server.stop()
        redis_server.start()  # empty
        back = add_node(stack, redis_server.url, tmp_path, 1)
        wait_state(back, "p", None, timeout_s=20)
        time.sleep(1.0)  # a few reconcile passes (0.5 s): nothing brings it back
        for node in (nodes[0], back):
            assert state(node, "p") is None
        # and a registration made after the deletion is not undone by its memory
        with back.client() as c:
            assert c.put("/v1/pipelines/p", json=local_spec(tmp_path)
            ).status_code == 202
        for node in (nodes[0], back):
            wait_state(node, "p", "warm", timeout_s=20)
