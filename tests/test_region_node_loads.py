"""Replicas loading from a region of three real ``weightcache serve`` processes: eight
concurrent loads spread over the nodes, and a node killed with SIGKILL (still listed as a
holder until its membership expires) costs the loads nothing but a failover."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from clients.seaweed import SeaweedServer
from loader import load
from loader.sinks import staging_pool
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import REGION, SECRET, until
from tests.fixtures.serve_process import ServeProcess, serve_process

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    yield
    staging_pool.clear()


def _env(redis_url: str, node_id: str, seaweed: SeaweedServer) -> dict[str, str]:
    return {
        "WEIGHTCACHE_S3_ENDPOINT_URL": seaweed.endpoint_url,
        "WEIGHTCACHE_S3_ACCESS_KEY_ID": seaweed.access_key,
        "WEIGHTCACHE_S3_SECRET_ACCESS_KEY": seaweed.secret_key,
        "WEIGHTCACHE_REDIS_URL": redis_url,
        "WEIGHTCACHE_REGION": REGION,
        "WEIGHTCACHE_NODE_ID": node_id,
        "WEIGHTCACHE_REGION_SECRET": SECRET,
        "WEIGHTCACHE_REGION_HEARTBEAT_INTERVAL_S": "0.5",
        # a killed node stays listed this long: the loads below must fail over from it
        "WEIGHTCACHE_REGION_HEARTBEAT_TTL_S": "4",
        "WEIGHTCACHE_REGION_RECONCILE_INTERVAL_S": "0.5",
    }


def _warm(node: ServeProcess) -> bool:
    with node.client() as client:
        answer = client.get("/v1/pipelines/p")
    return answer.status_code == 200 and answer.json()["state"] == "warm"


#: A load's tensors, bytes by node URL, and the nodes that failed it.
Outcome = tuple[dict[str, torch.Tensor], dict[str, int], dict[str, str]]


def _loads(nodes: list[ServeProcess], count: int) -> list[Outcome]:
    def one(index: int) -> Outcome:
        # not verify: it reads whole 64 MiB digest chunks, so this blob in one request; the
        # tensors are compared with what was uploaded instead
        result = load("p", url=nodes[index % len(nodes)].url, device="cpu",
                      request_size=256 * 1024, workers=4)
        return result.tensors, result.report.bytes_by_node, result.report.failed_nodes

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(one, range(count)))


def test_eight_loads_spread_over_three_nodes_and_survive_a_killed_one(
    tmp_path: Path, redis_server: RedisServer, seaweed: SeaweedServer, bucket: str
) -> None:
    generator = torch.Generator().manual_seed(7)
    expected = {f"w{i}": torch.randn(256, 1024, generator=generator) for i in range(8)}
    save_file(expected, str(tmp_path / "model.safetensors"))
    seaweed.put(bucket, "m/model.safetensors", (tmp_path / "model.safetensors").read_bytes())
    for i in range(3):
        (tmp_path / f"n{i}").mkdir()
    with ExitStack() as stack:
        nodes = [
            stack.enter_context(serve_process(
                tmp_path / f"n{i}", workers=1, env=_env(redis_server.url, f"n{i}", seaweed)))
            for i in range(3)
        ]
        with nodes[0].client() as client:
            assert client.put("/v1/pipelines/p", json={"models": [
                {"name": "m", "source": f"s3://{bucket}/m"}]}).status_code == 202
        for node in nodes:
            until(lambda node=node: _warm(node), what="warm on every node")  # type: ignore[misc]

        results = _loads(nodes, 8)
        served: dict[str, int] = {}
        for tensors, by_node, failed in results:
            assert tensors.keys() == expected.keys()
            assert all(torch.equal(tensors[n], t) for n, t in expected.items())
            assert failed == {}
            for url, count in by_node.items():
                served[url] = served.get(url, 0) + count
        assert set(served) == {node.data_url for node in nodes}, served

        # SIGKILL: no goodbye, so the region lists it as a holder until its record expires
        dead = nodes[2]
        for pid in (*dead.worker_pids(), dead.pid):
            os.kill(pid, signal.SIGKILL)
        dead.process.wait()
        results = _loads(nodes[:2], 4)
        failed_over = 0
        for tensors, by_node, failed in results:
            assert all(torch.equal(tensors[n], t) for n, t in expected.items())
            assert dead.data_url not in by_node
            failed_over += dead.data_url in failed
        assert failed_over > 0
