"""A cache node pulling from a real S3 server (SeaweedFS) through a counting proxy.

The proxy is the origin as the node sees it, so its byte counts are "what the origin sent".
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from clients.seaweed import SeaweedServer
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.node_server import free_port, running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes

MiB = 1024 * 1024


def _upload(seaweed: SeaweedServer, bucket: str, files: dict[str, bytes], *, sums: bool) -> None:
    for name, data in files.items():
        seaweed.put(bucket, f"m/{name}", data)
    if sums:
        lines = "".join(f"{hashlib.sha256(d).hexdigest()}  {n}\n" for n, d in files.items())
        seaweed.put(bucket, "m/SHA256SUMS", lines.encode())


def _s3(proxy: CountingProxy, seaweed: SeaweedServer) -> dict[str, Any]:
    return {
        "endpoint_url": proxy.endpoint_url,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
    }


def _fetch(**overrides: Any) -> dict[str, Any]:
    return {"part_size": "1MiB", "backoff_base_s": 0.05, **overrides}


def test_64_concurrent_registrations_fetch_each_object_once(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    files = {"model.safetensors": safetensors_bytes(6 * MiB), "config.json": b'{"model_type": "x"}'}
    _upload(seaweed, bucket, files, sums=True)
    proxy.reset_counts()
    settings = {"data_dir": tmp_path / "d", "s3": _s3(proxy, seaweed), "fetch": _fetch()}
    with running_node(**settings) as node, node.client() as c:
        body = {"models": [{"name": "m", "source": f"s3://{bucket}/m"}]}

        def register(i: int) -> int:
            with httpx.Client(base_url=node.url, timeout=60) as client:
                return client.put(f"/v1/pipelines/s{i}", json=body).status_code

        with ThreadPoolExecutor(64) as pool:
            assert set(pool.map(register, range(64))) == {202}
        for i in range(64):
            assert wait_for_state(c, f"s{i}", {"warm", "failed"})["state"] == "warm"
        for name, data in files.items():
            assert proxy.bytes_sent(f"/{bucket}/m/{name}") == len(data), name


def test_mismatching_declared_digest_fails_with_integrity_error(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    weights = safetensors_bytes(2 * MiB)
    seaweed.put(bucket, "m/model.safetensors", weights)
    seaweed.put(bucket, "m/SHA256SUMS", f"{'0' * 64}  model.safetensors\n".encode())
    settings = {"data_dir": tmp_path / "d", "s3": _s3(proxy, seaweed), "fetch": _fetch()}
    with running_node(**settings) as node, node.client() as c:
        c.put("/v1/pipelines/bad", json={"models": [{"name": "m", "source": f"s3://{bucket}/m"}]})
        status = wait_for_state(c, "bad", {"warm", "failed"})
        assert status["state"] == "failed"
        assert status["error"]["code"] == "integrity_error"
        assert "0" * 64 in status["error"]["message"]
        assert list(node.node.store.records()) == []


def test_larger_than_capacity_is_507_before_any_origin_byte(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    _upload(seaweed, bucket, {"model.safetensors": safetensors_bytes(3 * MiB)}, sums=False)
    proxy.reset_counts()
    settings = {
        "data_dir": tmp_path / "d",
        "capacity": "1MiB",
        "s3": _s3(proxy, seaweed),
        "fetch": _fetch(),
    }
    with running_node(**settings) as node, node.client() as c:
        body = {"models": [{"name": "m", "source": f"s3://{bucket}/m"}]}
        answer = c.put("/v1/pipelines/big", json=body)
        assert answer.status_code == 507
        assert proxy.gets(f"/{bucket}/m/model.safetensors") == 0
        assert proxy.bytes_sent(f"/{bucket}/m/model.safetensors") == 0


def _serve(data_dir: Path, port: int, proxy: CountingProxy, seaweed: SeaweedServer) -> Any:
    env = {
        **os.environ,
        "WEIGHTCACHE_S3_ENDPOINT_URL": proxy.endpoint_url,
        "WEIGHTCACHE_S3_ACCESS_KEY_ID": seaweed.access_key,
        "WEIGHTCACHE_S3_SECRET_ACCESS_KEY": seaweed.secret_key,
        "WEIGHTCACHE_FETCH_PART_SIZE": "1MiB",
        "WEIGHTCACHE_FETCH_CONCURRENCY": "2",
    }
    command = [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data_dir),
               "--port", str(port), "--capacity", "1GiB", "--data-workers", "0"]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError("node did not start")


def test_kill_9_mid_fill_then_restart_resumes_without_refetching(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    weights = safetensors_bytes(48 * MiB)
    key = f"/{bucket}/m/model.safetensors"
    _upload(seaweed, bucket, {"model.safetensors": weights}, sums=True)
    expected = hashlib.sha256(weights).hexdigest()
    data_dir = tmp_path / "d"
    proxy.reset_counts()
    proxy.add_fault(Fault(match="model.safetensors", times=None, delay_s=0.05))
    port = free_port()
    node = _serve(data_dir, port, proxy, seaweed)
    try:
        body = {"models": [{"name": "m", "source": f"s3://{bucket}/m"}]}
        url = f"http://127.0.0.1:{port}"
        assert httpx.put(f"{url}/v1/pipelines/p", json=body, timeout=30).status_code == 202
        deadline = time.monotonic() + 60
        while proxy.bytes_sent(key) < 0.6 * len(weights):
            assert time.monotonic() < deadline, "the fill did not progress"
            time.sleep(0.005)
        node.send_signal(signal.SIGKILL)
        node.wait(timeout=10)
    finally:
        if node.poll() is None:
            node.kill()
    first = proxy.bytes_sent(key)
    assert first < len(weights)
    assert not (data_dir / "blobs" / expected[:2] / expected).exists()  # nothing partial visible
    proxy.clear_faults()
    proxy.reset_counts()
    node = _serve(data_dir, port, proxy, seaweed)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            status = wait_for_state(client, "p", {"warm", "failed"})
            assert status["state"] == "warm", status
            assert proxy.bytes_sent(key) <= 0.45 * len(weights), proxy.bytes_sent(key)
            answer = client.get(f"/v1/blobs/{expected}")
            assert hashlib.sha256(answer.content).hexdigest() == expected
    finally:
        node.terminate()
        node.wait(timeout=30)
    assert not list((data_dir / "tmp").iterdir())
