"""Safe defaults: no auth only on loopback unless said so; ``file://`` only under --local-root."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.fixtures.node_server import free_port, running_node

ROOT = Path(__file__).resolve().parent.parent


def serve(*args: str, data_dir: Path) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data_dir),
               "--data-workers", "0", *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("WEIGHTCACHE_")}
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_healthy(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.poll() is None, process.communicate()
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            time.sleep(0.1)
    raise TimeoutError("node did not start")


def test_serve_on_an_open_address_without_tokens_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    refused = serve("--host", "0.0.0.0", "--port", str(port), data_dir=tmp_path / "d")
    try:
        _, stderr = refused.communicate(timeout=60)
    finally:
        if refused.poll() is None:  # it started after all: stop it, then fail
            refused.kill()
            refused.communicate()
    assert refused.returncode != 0
    assert "--allow-unauthenticated" in stderr
    assert "--tokens" in stderr
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1)

    allowed = serve("--host", "0.0.0.0", "--port", str(port), "--allow-unauthenticated",
                    data_dir=tmp_path / "d")
    try:
        wait_healthy(f"http://127.0.0.1:{port}", allowed)
    finally:
        allowed.terminate()
        allowed.communicate(timeout=30)  # reaps it and closes its pipes


def test_a_bad_tokens_file_stops_serve_without_echoing_it(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tokens": {"tok-secret-123": "a"},
                                  "tenants": {"a": {"sources": ["ftp://nope/"]}}}))
    process = serve("--host", "0.0.0.0", "--port", str(free_port()), "--tokens", str(tokens),
                    data_dir=tmp_path / "d")
    stdout, stderr = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "ftp://nope/" in stderr
    assert "tok-secret-123" not in stdout + stderr


@pytest.mark.parametrize("auth", [False, True])
def test_file_sources_need_a_local_root_with_or_without_auth(tmp_path: Path, auth: bool) -> None:
    models = tmp_path / "models" / "m"
    models.mkdir(parents=True)
    (models / "config.json").write_text("{}")
    settings: dict[str, object] = {"data_dir": tmp_path / "data", "local_roots": []}
    if auth:
        tokens = tmp_path / "tokens.json"
        tokens.write_text(json.dumps({"tok": "team"}))
        settings["tokens_file"] = tokens
    with running_node(**settings) as node, node.client("tok" if auth else None) as client:
        answer = client.put(
            "/v1/pipelines/p", json={"models": [{"name": "m", "source": f"file://{models}"}]}
        )
        assert answer.status_code == 400, answer.text
        error = answer.json()["error"]
        assert error["reason"] == "no_local_root"
        assert "--local-root" in error["message"]
        assert client.get("/v1/pipelines/p").status_code == 404
    settings["local_roots"] = [tmp_path / "models"]
    with running_node(**settings) as node, node.client("tok" if auth else None) as client:
        answer = client.put(
            "/v1/pipelines/p", json={"models": [{"name": "m", "source": f"file://{models}"}]}
        )
        assert answer.status_code == 202, answer.text
