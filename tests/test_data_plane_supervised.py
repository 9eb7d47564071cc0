"""The data plane under ``weightcache serve``: supervised workers, readiness, metrics, fallback.

A real ``serve`` subprocess with two data-plane workers: ``kill -9`` both, watch ``/readyz`` say
so, the supervisor start them again (event and metric), the byte counters stay right across
the restart; and a replica whose data-plane URL is refused or answers 5xx gets its ranges from
the node's API instead, and says so in its load report.
"""

from __future__ import annotations

import hashlib
import http.server
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from loader import load
from tests.fixtures.node_server import free_port
from tests.fixtures.serve_process import ServeProcess, register_local, serve_process
from tests.test_metrics import Scrape


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    tmp = tmp_path_factory.mktemp("supervised")
    model = tmp / "model"
    model.mkdir()
    generator = torch.Generator().manual_seed(7)
    tensors = {
        "model.embed_tokens.weight": torch.randn(512, 256, generator=generator),
        "model.norm.weight": torch.randn(256, generator=generator),
    }
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text('{"model_type": "unknown-arch"}')
    env = {"WEIGHTCACHE_DATA_PLANE_RESTART_BACKOFF_S": "1"}
    with serve_process(tmp, workers=2, env=env) as running:
        with running.client() as client:
            register_local(client, "m", model)
        yield running


def _blob(node: ServeProcess) -> tuple[str, bytes]:
    with node.client() as client:
        files = client.get("/v1/pipelines/m/files").json()["files"]
    (entry,) = [f for f in files if f["path"] == "model.safetensors"]
    data = client_get(node, f"/v1/blobs/{entry['blob']}").content
    assert hashlib.sha256(data).hexdigest() == entry["blob"]
    return entry["blob"], data


def client_get(node: ServeProcess, path: str, **kwargs: Any) -> httpx.Response:
    with node.client() as client:
        return client.get(path, **kwargs)


def _metrics(node: ServeProcess) -> Scrape:
    return Scrape(client_get(node, "/metrics").text)


def _until(what: str, check: Any, timeout_s: float = 30) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.02)


def test_killed_workers_are_restarted_and_their_counts_kept(node: ServeProcess) -> None:
    sha, data = _blob(node)
    before = _metrics(node).get("weightcache_data_plane_bytes_served_total")
    for _ in range(3):
        answer = httpx.get(f"{node.data_url}/v1/blobs/{sha}", timeout=30)
        assert answer.status_code == 200
        assert answer.content == data
    served = before + 3 * len(data)
    _until("bytes counted", lambda: _metrics(node).get(
        "weightcache_data_plane_bytes_served_total") == served)
    assert client_get(node, "/readyz").status_code == 200

    old = node.worker_pids()
    assert len(old) == 2
    for pid in old:
        os.kill(pid, signal.SIGKILL)
    down = _until("readyz says the data plane is down",
                  lambda: (r := client_get(node, "/readyz")).status_code == 503 and r)
    (reason,) = down.json()["reasons"]
    assert reason["code"] == "data_plane_down"

    _until("ready again", lambda: client_get(node, "/readyz").status_code == 200)
    _until("both restarted", lambda: _metrics(node).get(
        "weightcache_data_plane_worker_restarts_total") == 2)
    assert not set(node.worker_pids()) & set(old)
    after = _metrics(node)
    assert after.get("weightcache_data_plane_workers") == 2
    # What the dead workers served still counts; the new ones add to it.
    assert after.get("weightcache_data_plane_bytes_served_total") == served
    answer = httpx.get(f"{node.data_url}/v1/blobs/{sha}", timeout=30)
    assert answer.content == data
    _until("new bytes counted", lambda: _metrics(node).get(
        "weightcache_data_plane_bytes_served_total") == served + len(data))

    restarted = [e for e in node.events() if e["event"] == "data_plane.worker_restarted"]
    assert sorted(e["old_pid"] for e in restarted) == old
    assert {e["slot"] for e in restarted} == {0, 1}


def _expected(node: ServeProcess) -> dict[str, torch.Tensor]:
    source = node.data_dir.parent / "model" / "model.safetensors"
    return load_file(str(source))


def _check(result: Any, node: ServeProcess) -> None:
    expected = _expected(node)
    assert result.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(result.tensors[name], tensor), name


def test_a_healthy_data_plane_serves_the_load(node: ServeProcess) -> None:
    result = load("m", url=node.url, request_size=64 * 1024, workers=2)
    _check(result, node)
    assert result.report.fallback_reads == 0
    assert result.report.fallback_reason is None


def test_a_refused_data_plane_falls_back_to_the_api(node: ServeProcess) -> None:
    refused = f"http://127.0.0.1:{free_port()}"
    result = load("m", url=node.url, data_urls=[refused], request_size=64 * 1024, workers=2)
    _check(result, node)
    assert result.report.fallback_reads == result.report.stream.requests > 1
    assert result.report.fallback_reason is not None
    assert refused in result.report.fallback_reason
    assert result.report.as_dict()["fallback_reads"] == result.report.fallback_reads


class _Failing(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"error": {"code": "internal", "message": "boom"}}'
        self.send_response(503)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_a_data_plane_answering_5xx_falls_back_to_the_api(node: ServeProcess) -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Failing)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        failing = f"http://127.0.0.1:{server.server_address[1]}"
        result = load("m", url=node.url, data_urls=[failing], request_size=64 * 1024,
                      workers=2)
    finally:
        server.shutdown()
        server.server_close()
    _check(result, node)
    assert result.report.fallback_reads == result.report.stream.requests
    assert result.report.fallback_reason is not None
    assert "503" in result.report.fallback_reason


def test_load_cli_says_it_fell_back(node: ServeProcess, tmp_path: Path,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    from clients.load_cli import print_stage_table

    result = load("m", url=node.url, data_urls=[f"http://127.0.0.1:{free_port()}"])
    report = result.report.as_dict()
    report["gb_per_s"] = result.report.gb_per_s
    print_stage_table(report)
    assert "came from the node's API instead of its data plane" in capsys.readouterr().out


def test_restarts_back_off_and_cap() -> None:
    from api.data_plane_supervisor import restart_delay
    from cache_node.settings import DataPlaneSettings

    config = DataPlaneSettings(restart_backoff_s=0.5, restart_backoff_cap_s=30)
    delays = [restart_delay(n, config) for n in range(1, 10)]
    assert delays[:4] == [0.5, 1.0, 2.0, 4.0]
    assert delays == sorted(delays)
    assert max(delays) == 30
    assert restart_delay(10_000, config) == 30
