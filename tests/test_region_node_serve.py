"""``weightcache serve --redis``: refused without a region secret that can guard a region; with
one, the node joins under its advertised URL and its data plane takes peer requests too."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.fixtures.node_server import free_port
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import (
    REGION,
    SECRET,
    get,
    local_model,
    local_spec,
    peer_headers,
    until,
)

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str, data_dir: Path, secret: str | None = None) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data_dir), *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")}
    if secret is not None:
        env["WEIGHTCACHE_REGION_SECRET"] = secret
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_serve_with_redis_refuses_to_start_without_a_long_enough_secret(tmp_path: Path) -> None:
    redis = "redis://127.0.0.1:9/0"  # never reached: the refusal comes first
    short = tmp_path / "short"
    short.write_text("too-short\n")
    for extra, secret in (([], None), ([], "s" * 31), (["--region-secret-file", str(short)], None)):
        process = serve("--redis", redis, "--data-workers", "0", *extra,
                        data_dir=tmp_path / "d", secret=secret)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
        assert "region secret of at least 32 characters" in lines[0]
        assert "too-short" not in stderr


def test_serve_with_redis_refuses_an_advertised_url_replicas_could_not_use(
    tmp_path: Path,
) -> None:
    # every manifest names the holders' URLs, and replicas send their token there: a URL
    # without a scheme would break every load in the region
    for bad in ("node-b:8470", "http://node b:8470", "ftp://node-b"):
        process = serve("--redis", "redis://127.0.0.1:9/0", "--data-workers", "0",
                        "--advertise", bad, data_dir=tmp_path / "d", secret=SECRET)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 2, stderr
        lines = [line for line in stderr.splitlines() if line.strip()]
        assert len(lines) == 1, stderr
        assert "--advertise" in lines[0]
        assert "http(s)://host[:port][/prefix]" in lines[0]


def test_serve_joins_under_its_advertised_url_and_its_data_plane_serves_peers(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    weights = local_model(tmp_path, 128 * 1024)
    sha = hashlib.sha256(weights).hexdigest()
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")
    port, data_port = free_port(), free_port()
    advertised = f"http://node-a.example:{port}"
    process = serve(
        "--port", str(port), "--data-port", str(data_port), "--data-workers", "1",
        "--redis", redis_server.url, "--region", REGION, "--advertise", advertised,
        "--region-secret-file", str(secret_file), "--local-root", str(tmp_path),
        data_dir=tmp_path / "d",
    )
    try:
        client = redis_server.client()
        prefix = f"weightcache:{{{REGION}}}:"
        until(lambda: client.smembers(f"{prefix}nodes") != set(), timeout_s=30, what="joined")
        node_id = str(next(iter(client.smembers(f"{prefix}nodes"))))
        record = json.loads(client.get(f"{prefix}node:{node_id}") or "{}")
        assert record["url"] == advertised
        assert record["data_url"] == f"http://127.0.0.1:{data_port}"
        api = f"http://127.0.0.1:{port}"
        httpx.put(f"{api}/v1/pipelines/p", timeout=10, json=local_spec(tmp_path))
        until(lambda: get(f"{api}/v1/pipelines/p").json()["state"] == "warm", what="warm")
        blob = f"http://127.0.0.1:{data_port}/v1/blobs/{sha}"
        assert get(blob, headers=peer_headers()).content == weights
        refused = get(blob, headers=peer_headers(secret="y" * 40))
        assert refused.status_code == 401
        assert get(blob, headers={"Authorization": "WeightcacheNode n1"}).status_code == 401
        manifest = get(f"{api}/v1/pipelines/p/manifest").json()
        assert manifest["blobs"][0]["nodes"] == [f"http://127.0.0.1:{data_port}"]
        client.close()
    finally:
        process.terminate()
        process.communicate(timeout=30)
