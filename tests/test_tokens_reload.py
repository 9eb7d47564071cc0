"""Tokens without restarts: the tokens file is followed by the API and every data-plane worker.

A real node (uvicorn in this process) with two real data-plane worker processes: a token removed
from the file is refused (401) on both ports within seconds, a token added works, an edit that
does not parse keeps the tokens last read (never open access) and is reported in ``/readyz``,
``/metrics`` and the event log; and ``weightcache serve`` as a subprocess re-reads the file on
``SIGHUP`` in the API process and every worker, including a worker started again while the
file on disk is bad. The cache is the same throughout: same processes, same warm pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

import httpx
import pytest
import torch
from safetensors.torch import save_file

from api.data_plane import run_data_plane, stats_dir, stop_data_plane
from cache_node.worker_stats import WorkerStats
from tests.fixtures.node_server import RunningNode, free_port, running_node
from tests.fixtures.serve_process import ServeProcess, register_local, serve_process
from tests.test_metrics import Scrape

WORKERS = 2
#: New connections per check of the data plane: SO_REUSEPORT spreads them over the workers.
PROBES = 12
#: A change must take effect well within this (the check interval is 1 s).
TAKES_EFFECT_S = 5.0
RANGE = {"Range": "bytes=0-99"}

T = TypeVar("T")


def until(
    what: str, check: Callable[[], T | Literal[False] | None], *, timeout_s: float = 15.0
) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.05)


def write_tokens(path: Path, tokens: dict[str, Any] | str, *, in_place: bool = False) -> None:
    """A new version of the tokens file: renamed over the old one (as an operator's tool or a
    Kubernetes Secret update does), or rewritten in place (as an editor may)."""
    text = tokens if isinstance(tokens, str) else json.dumps(tokens)
    if in_place:
        path.write_text(text)
        return
    temp = path.with_suffix(".new")
    temp.write_text(text)
    os.replace(temp, path)


@dataclass
class Node:
    """The node's two ports, its tokens file and a blob of the pipeline team-a registered."""

    url: str
    data_url: str
    tokens_file: Path
    blob: str
    blob_bytes: bytes

    def api(self, path: str, token: str | None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30)

    def api_status(self, token: str | None) -> int:
        return self.api("/v1/pipelines/chat", token).status_code

    def data_plane(self, token: str | None) -> list[int]:
        """Status of a range read of the blob on the data plane, once per new connection."""
        headers = dict(RANGE)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        statuses = []
        for _ in range(PROBES):
            answer = httpx.get(f"{self.data_url}/v1/blobs/{self.blob}", headers=headers, timeout=30)
            if answer.status_code == 206:
                assert answer.content == self.blob_bytes[:100]
            statuses.append(answer.status_code)
        return statuses

    def accepted(self, token: str) -> bool:
        return self.api_status(token) == 200 and set(self.data_plane(token)) == {206}

    def refused(self, token: str | None) -> bool:
        return self.api_status(token) == 401 and set(self.data_plane(token)) == {401}

    def metrics(self) -> Scrape:
        return Scrape(httpx.get(f"{self.url}/metrics", timeout=30).text)

    def readyz(self) -> httpx.Response:
        return httpx.get(f"{self.url}/readyz", timeout=30)

    def warning(self) -> dict[str, Any] | None:
        answer = self.readyz()
        assert answer.status_code == 200, answer.text  # a bad tokens file never fails readiness
        warnings = [w for w in answer.json().get("warnings", [])
                    if w["code"] == "tokens_file_invalid"]
        return warnings[0] if warnings else None


def make_model(directory: Path) -> None:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(3)
    save_file({"model.embed_tokens.weight": torch.randn(256, 64, generator=generator),
               "model.norm.weight": torch.randn(64, generator=generator)},
              str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "unknown-arch"}')


def register(url: str, token: str, source: Path) -> tuple[str, bytes]:
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"},
                      timeout=30) as client:
        status = register_local(client, "chat", source)
        assert status["tenant"] == "team-a"
        files = client.get("/v1/pipelines/chat/files").json()["files"]
    (entry,) = [f for f in files if f["path"] == "model.safetensors"]
    data = (source / "model.safetensors").read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["blob"]
    return entry["blob"], data


FIRST = {"tok-a": "team-a", "tok-b": "team-a", "tok-admin": "admin"}


# ------------------------------------------------------------------- a node in this process


@dataclass
class InProcess:
    node: Node
    running: RunningNode
    workers: list[Any]

    def slot_counts(self) -> list[dict[str, int]]:
        directory = stats_dir(self.running.settings)
        counts = []
        for slot in range(WORKERS):
            stats = WorkerStats(directory, slot)
            counts.append(stats.read())
            stats.close()
        return counts


@pytest.fixture(scope="module")
def in_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InProcess]:
    root = tmp_path_factory.mktemp("tokens_reload")
    tokens_file = root / "tokens.json"
    write_tokens(tokens_file, FIRST)
    make_model(root / "model")
    port = free_port()
    data_url = f"http://127.0.0.1:{port}"
    with running_node(data_dir=root / "data", capacity="1GiB", tokens_file=tokens_file,
                      local_roots=[root], data_url=data_url) as running:
        blob, data = register(running.url, "tok-a", root / "model")
        workers = run_data_plane(running.settings, port=port, workers=WORKERS)
        try:
            node = Node(running.url, data_url, tokens_file, blob, data)
            yield InProcess(node, running, workers)
        finally:
            stop_data_plane(workers)


@pytest.fixture
def fresh(in_process: InProcess) -> InProcess:
    """The module's node back on the first tokens, with the same processes as ever."""
    write_tokens(in_process.node.tokens_file, FIRST)
    # every token of FIRST, and only those: an earlier test's version may share some of them
    until("the first tokens in force", lambda: in_process.node.warning() is None
          and all(in_process.node.accepted(token) for token in FIRST)
          and in_process.node.refused("tok-new") and in_process.node.refused("tok-c"))
    return in_process


def test_revoked_token_is_refused_and_a_new_one_works_without_a_restart(
    fresh: InProcess,
) -> None:
    node, pids = fresh.node, [w.pid for w in fresh.workers]
    assert node.accepted("tok-a")
    before = fresh.slot_counts()

    started = time.monotonic()
    write_tokens(node.tokens_file, {"tok-b": "team-a", "tok-new": "team-a", "tok-admin": "admin"})
    until("tok-a refused by the API", lambda: node.api_status("tok-a") == 401)
    until("tok-a refused by every worker", lambda: node.refused("tok-a"))
    assert time.monotonic() - started < TAKES_EFFECT_S
    assert node.accepted("tok-new")
    assert node.accepted("tok-b")
    assert node.refused(None)

    # every worker re-read the file (its own counters), none was restarted, nothing re-fetched
    after = fresh.slot_counts()
    assert all(a["tokens_reloads"] > b["tokens_reloads"] for a, b in zip(after, before,
                                                                         strict=True))
    assert [w.pid for w in fresh.workers] == pids
    assert all(w.poll() is None for w in fresh.workers)
    status = node.api("/v1/pipelines/chat", "tok-new").json()
    assert (status["state"], status["bytes_cached"]) == ("warm", status["bytes_total"])
    # the new token is the same tenant: it sees team-a's pipeline, not a new, empty one
    assert status["tenant"] == "team-a"


def test_an_edit_in_place_is_seen_too(fresh: InProcess) -> None:
    node = fresh.node
    write_tokens(node.tokens_file, {"tok-b": "team-a", "tok-admin": "admin"}, in_place=True)
    until("tok-a refused", lambda: node.refused("tok-a"), timeout_s=TAKES_EFFECT_S)
    assert node.accepted("tok-b")


@pytest.mark.parametrize(
    "broken",
    [
        pytest.param('{"tok-a": "team-a", "tok-c": ', id="not-json"),
        pytest.param(json.dumps({"tok-a": "team-a", "tok-c": 7}), id="tenant-not-a-string"),
        pytest.param(json.dumps(["tok-a"]), id="not-an-object"),
        pytest.param(json.dumps({"tokens": {"tok-c": "team-c"},
                                 "tenants": {"team-c": {"local_roots": ["/elsewhere"]}}}),
                     id="local-root-outside-the-node's"),
        pytest.param(None, id="file-removed"),
    ],
)
def test_a_broken_edit_keeps_the_tokens_last_read_and_is_reported(
    fresh: InProcess, broken: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    node = fresh.node
    before = node.metrics()
    caplog.set_level(logging.ERROR, logger="weightcache.events")
    if broken is None:
        node.tokens_file.unlink()
    else:
        write_tokens(node.tokens_file, broken)

    warning = until("readyz warns for every process", lambda: (
        (w := node.warning()) and "reason" in w and w["stale_data_plane_workers"] == WORKERS
        and w), timeout_s=TAKES_EFFECT_S)
    assert "tok-a" not in json.dumps(warning)  # reasons never quote a token
    after = node.metrics()
    assert after.get("weightcache_tokens_stale", process="data_plane") == WORKERS
    assert after.get("weightcache_tokens_stale", process="api") == 1
    for process, count in (("api", 1), ("data_plane", WORKERS)):
        failed = after.get("weightcache_tokens_reloads_total", process=process, result="failed")
        assert failed - before.get("weightcache_tokens_reloads_total", process=process,
                                   result="failed") == count
    (event,) = [r for r in caplog.records if r.getMessage() == "tokens.reload_failed"]
    assert event.event_fields["process"] == "api"  # type: ignore[attr-defined]

    # the old tokens keep working everywhere; nothing else does, and auth never turns off
    assert node.accepted("tok-a")
    assert node.accepted("tok-admin")
    assert node.refused("tok-c")
    assert node.refused(None)
    assert node.warning() is not None  # still reported while the file stays bad

    # a good version again: taken in, and the warning and the stale gauges are gone
    write_tokens(node.tokens_file, {"tok-a": "team-a", "tok-c": "team-a"})
    until("the repaired file in force", lambda: node.accepted("tok-c"))
    until("no warning", lambda: node.warning() is None, timeout_s=TAKES_EFFECT_S)
    assert node.refused("tok-b")
    healed = node.metrics()
    assert healed.get("weightcache_tokens_stale", process="api") == 0
    assert healed.get("weightcache_tokens_stale", process="data_plane") == 0


# ------------------------------------------------------ weightcache serve, a real subprocess


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ServeProcess, Node]]:
    """``weightcache serve`` that looks at the file only when told (SIGHUP): its check
    interval is an hour, so whatever changes below changes because of the signal."""
    make_model(tmp_path / "model")
    env = {"WEIGHTCACHE_TOKENS_CHECK_INTERVAL_S": "3600",
           "WEIGHTCACHE_DATA_PLANE_RESTART_BACKOFF_S": "0.2"}
    with serve_process(tmp_path, workers=WORKERS, tokens=FIRST, env=env) as process:
        blob, data = register(process.url, "tok-a", tmp_path / "model")
        yield process, Node(process.url, process.data_url, tmp_path / "tokens.json", blob, data)


def _reload_events(process: ServeProcess, event: str) -> list[dict[str, Any]]:
    return [e for e in process.events() if e["event"] == event]


def test_sighup_reloads_the_api_and_every_worker(served: tuple[ServeProcess, Node]) -> None:
    process, node = served
    workers = process.worker_pids()
    assert len(workers) == WORKERS
    write_tokens(node.tokens_file, {"tok-new": "team-a", "tok-admin": "admin"})
    time.sleep(1.5)  # longer than the default interval: nothing is looking
    assert node.accepted("tok-a")

    os.kill(process.pid, signal.SIGHUP)
    until("tok-a refused everywhere", lambda: node.refused("tok-a"), timeout_s=TAKES_EFFECT_S)
    assert node.accepted("tok-new")
    reloaded = until("every process says so", lambda: len(
        events := _reload_events(process, "tokens.reloaded")) == 1 + WORKERS and events)
    assert sorted(e["process"] for e in reloaded) == ["api"] + ["data_plane"] * WORKERS
    assert all(e["forced"] and e["removed"] == 2 and e["added"] == 1 for e in reloaded)
    # the same processes: nothing restarted, the pipeline still warm
    assert process.worker_pids() == workers
    assert node.api("/v1/pipelines/chat", "tok-new").json()["state"] == "warm"


def test_a_worker_restarted_while_the_file_is_bad_keeps_the_last_good_tokens(
    served: tuple[ServeProcess, Node],
) -> None:
    process, node = served
    write_tokens(node.tokens_file, {"tok-new": "team-a", "tok-admin": "admin"})
    os.kill(process.pid, signal.SIGHUP)
    until("tok-new in force", lambda: node.accepted("tok-new"), timeout_s=TAKES_EFFECT_S)

    write_tokens(node.tokens_file, "{ not json")
    os.kill(process.pid, signal.SIGHUP)
    until("every process reports the bad file", lambda: len(
        _reload_events(process, "tokens.reload_failed")) == 1 + WORKERS)
    warning = until("readyz warns", node.warning, timeout_s=TAKES_EFFECT_S)
    assert warning["stale_data_plane_workers"] == WORKERS

    old = process.worker_pids()
    os.kill(old[0], signal.SIGKILL)
    until("the worker restarted", lambda: len(set(process.worker_pids()) - set(old)) == 1
          and node.readyz().status_code == 200)
    # every worker, the new one included, holds the last good tokens: never the file's
    # older versions, never none
    assert node.accepted("tok-new")
    assert node.refused("tok-a")
    assert node.refused(None)
    # the new worker found the file bad and said so (its log line may still be on its way)
    until("the new worker reports the bad file", lambda: len(
        [e for e in _reload_events(process, "tokens.reload_failed")
         if e["process"] == "data_plane"]) == WORKERS + 1, timeout_s=TAKES_EFFECT_S)

    write_tokens(node.tokens_file, {"tok-new": "team-a", "tok-c": "team-a"})
    os.kill(process.pid, signal.SIGHUP)
    until("the repaired file in force", lambda: node.accepted("tok-c"), timeout_s=TAKES_EFFECT_S)
    until("no warning", lambda: node.warning() is None, timeout_s=TAKES_EFFECT_S)
