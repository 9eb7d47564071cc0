"""Space accounting stays exact under concurrency (I5), against a real node over HTTP.

Many clients at once register one model (several tenants, several sources holding the same
bytes, TP shard sets), and register, delete, evict and warm race each other. Once the node is
idle: ``used`` equals the bytes of the blob files on disk (the data dir walked), every record has
its file and every file its record, ``reserved`` is 0 and no temp is left. A PUT racing a DELETE
never answers 404: the PUT is a registration that happened (202, the status it made), and the
DELETE either comes after it (the pipeline is then gone) or before it (404 to the DELETE).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.fixtures.node_server import RunningNode, running_node
from tests.fixtures.tiny_llama import make_tiny_llama

MiB = 1024 * 1024
TENANTS = {"tok-a": "alice", "tok-b": "bob", "tok-c": "carol"}


def _sources(tmp_path: Path) -> list[Path]:
    """Four directories holding the very same files: four origins of one content."""
    first = make_tiny_llama(tmp_path / "models" / "src0", num_kv_heads=4, vocab_size=1000)
    (first / "extra.bin").write_bytes(os.urandom(3 * MiB))
    sources = [first]
    for i in range(1, 4):
        sources.append(Path(shutil.copytree(first, tmp_path / "models" / f"src{i}")))
    return sources


def _settings(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TENANTS))
    return {
        "data_dir": tmp_path / "data",
        "tokens_file": tokens,
        "local_roots": [tmp_path / "models"],
        "fetch": {"part_size": "1MiB"},
        "eviction": {"hot_window_s": 0},
        **extra,
    }


def _client(node: RunningNode, token: str) -> httpx.Client:
    return httpx.Client(base_url=node.url, headers={"Authorization": f"Bearer {token}"},
                        timeout=60)


def _wait_idle(node: RunningNode, admin: httpx.Client, *, timeout_s: float = 120) -> None:
    """Until no pipeline is warming and the node runs no job, transfer or shard build."""
    inner = node.node
    deadline = time.monotonic() + timeout_s
    while True:
        states = {p["state"] for p in admin.get("/v1/pipelines").json()["pipelines"]}
        busy = inner.warming.busy() or inner.fetcher._transfers
        if "warming" not in states and not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"node still busy: {states}, {busy}")
        time.sleep(0.05)


def _check_accounting(node: RunningNode, client: httpx.Client, data_dir: Path) -> None:
    on_disk = {p.name: p.stat().st_size for p in (data_dir / "blobs").rglob("*") if p.is_file()}
    records = {r.sha256: r.size for r in node.node.store.records()}
    assert on_disk == records
    info = client.get("/v1/node").json()
    assert info["used"] == sum(on_disk.values()), (info, sum(on_disk.values()))
    assert info["reserved"] == 0, info
    assert info["temp"] == 0, info
    assert sorted(p.name for p in (data_dir / "tmp").iterdir()) == []


def test_concurrent_registrations_of_one_model_count_every_byte_once(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    with running_node(**_settings(tmp_path, capacity="1GiB")) as node:
        tokens = list(TENANTS)

        def register(i: int) -> int:
            body = {"models": [{"name": "llm", "source": f"file://{sources[i % len(sources)]}"}],
                    "tp_sizes": [1, 2]}
            with _client(node, tokens[i % len(tokens)]) as c:
                return c.put(f"/v1/pipelines/p{i}", json=body).status_code

        with ThreadPoolExecutor(16) as pool:
            assert set(pool.map(register, range(16))) == {202}
        with _client(node, tokens[0]) as c:
            _wait_idle(node, c)
            for i in range(16):
                with _client(node, tokens[i % len(tokens)]) as owner:
                    status = owner.get(f"/v1/pipelines/p{i}").json()
                    assert status["state"] == "warm", status
            _check_accounting(node, c, tmp_path / "data")
            # one content, stored once: the files of one source and one TP 2 shard set
            records = list(node.node.registry.all())
            files = {f.blob: f.size for r in records for m in r.models for f in m.files}
            assert sum(files.values()) == sum(f.size for f in records[0].models[0].files)
            shards = {r.blob: r.size for rec in records for s in rec.shards.values()
                      for r in s.ranks}
            assert len(shards) == 2
            assert c.get("/v1/node").json()["used"] == sum(files.values()) + sum(shards.values())


def test_register_delete_evict_and_warm_racing_leave_exact_accounting(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    rng = random.Random(7)
    with running_node(**_settings(tmp_path, capacity="1GiB")) as node:
        tokens = list(TENANTS)
        ids = [f"r{i}" for i in range(6)]
        answers: list[tuple[str, int]] = []

        def act(step: int) -> None:
            local = random.Random(step)
            token = tokens[local.randrange(len(tokens))]
            pipeline = ids[local.randrange(len(ids))]
            op = local.choice(["put", "put", "delete", "evict", "warm"])
            body = {"models": [{"name": "llm",
                                "source": f"file://{sources[local.randrange(len(sources))]}"}],
                    "tp_sizes": local.choice([[1], [1, 2]])}
            with _client(node, token) as c:
                if op == "put":
                    code = c.put(f"/v1/pipelines/{pipeline}", json=body).status_code
                elif op == "delete":
                    code = c.delete(f"/v1/pipelines/{pipeline}").status_code
                elif op == "evict":
                    code = c.post(f"/v1/pipelines/{pipeline}/evict").status_code
                else:
                    code = c.post(f"/v1/pipelines/{pipeline}/warm").status_code
            answers.append((op, code))

        steps = list(range(200))
        rng.shuffle(steps)
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(act, steps))
        allowed = {"put": {200, 202}, "delete": {204, 404}, "evict": {202, 404, 409},
                   "warm": {202, 404}}
        wrong = [(op, code) for op, code in answers if code not in allowed[op]]
        assert not wrong, wrong
        with _client(node, tokens[0]) as c:
            _wait_idle(node, c)
            _check_accounting(node, c, tmp_path / "data")


def test_a_put_racing_a_delete_never_answers_404(tmp_path: Path) -> None:
    sources = _sources(tmp_path)
    with running_node(**_settings(tmp_path, capacity="1GiB")) as node:
        body = {"models": [{"name": "llm", "source": f"file://{sources[0]}"}], "tp_sizes": [1, 2]}
        puts: list[int] = []
        deletes: list[int] = []
        with _client(node, "tok-a") as c, ThreadPoolExecutor(8) as pool:
            for round_ in range(40):
                pipeline = f"race{round_ % 4}"
                put = pool.submit(c.put, f"/v1/pipelines/{pipeline}", json=body)
                gone = [pool.submit(c.delete, f"/v1/pipelines/{pipeline}") for _ in range(3)]
                puts.append(put.result().status_code)
                deletes.extend(f.result().status_code for f in gone)
            assert set(puts) <= {200, 202}, puts
            assert set(deletes) <= {204, 404}, deletes
            _wait_idle(node, c)
            _check_accounting(node, c, tmp_path / "data")
