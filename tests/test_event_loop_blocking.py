"""Nothing that blocks runs on the node's event loop (issue: blocking work off the loop).

The loop streams blobs and answers every replica of a region's cold starts; a route that
hashes a blob, reads a file or waits for an fsync on it stalls all of them. In the style of
anyio's blockbuster: the blocking primitives the node uses (file reads at an offset, fsync,
sleeps) are wrapped for the test, and any call made from a thread that is running an event
loop is recorded with where it came from. The whole API is then driven through a real node.
"""

from __future__ import annotations

import asyncio
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama

_BLOCKING = {
    (os, "pread"),
    (os, "preadv"),
    (os, "fsync"),
    (os, "fdatasync"),
    (time, "sleep"),
}


def _on_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@pytest.fixture
def loop_blocking_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of a blocking primitive made on an event loop, as 'name: where'."""
    calls: list[str] = []

    def guard(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def guarded(*args: Any, **kwargs: Any) -> Any:
            if _on_event_loop():
                frames = [
                    f"{Path(f.filename).name}:{f.lineno} {f.name}"
                    for f in traceback.extract_stack()[:-1]
                    if "site-packages" not in f.filename and "/lib/python" not in f.filename
                ]
                calls.append(f"{name}: {' <- '.join(reversed(frames[-4:]))}")
            return real(*args, **kwargs)

        return guarded

    for module, name in _BLOCKING:
        monkeypatch.setattr(module, name, guard(name, getattr(module, name)))
    return calls


def test_no_route_blocks_the_event_loop(tmp_path: Path, loop_blocking_calls: list[str]) -> None:
    source = tmp_path / "models" / "tiny"
    make_tiny_llama(source)
    spec = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [1, 2]}
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        assert c.put("/v1/pipelines/tiny", json=spec).status_code == 202
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        assert c.put("/v1/pipelines/tiny", json=spec).status_code == 200
        assert c.get("/v1/pipelines").status_code == 200
        assert c.get("/v1/node").status_code == 200
        assert c.get("/readyz").status_code == 200
        assert c.get("/metrics").status_code == 200
        blobs: set[str] = set()
        for tp_size, rank in ((1, 0), (2, 0), (2, 1)):
            answer = c.get(
                "/v1/pipelines/tiny/manifest", params={"tp_size": tp_size, "rank": rank}
            )
            assert answer.status_code == 200, answer.text
            blobs.update(t["blob"] for t in answer.json()["tensors"])
        assert c.get("/v1/pipelines/tiny/files").status_code == 200
        for blob in sorted(blobs):
            assert c.get(f"/v1/blobs/{blob}", headers={"Range": "bytes=0-1023"}).status_code == 206
            assert c.head(f"/v1/blobs/{blob}").status_code == 200
        lease = c.post("/v1/pipelines/tiny/leases").json()["lease_id"]
        assert c.post(f"/v1/leases/{lease}").status_code == 200
        assert c.delete(f"/v1/leases/{lease}").status_code == 204
        report = {"tp_size": 1, "rank": 0, "bytes": 1, "stages": {"total_s": 0.1}}
        assert c.post("/v1/pipelines/tiny/loads", json=report).status_code in (202, 422)
        assert c.get("/v1/pipelines/tiny/loads").status_code == 200
        assert c.get("/v1/loads").status_code == 200
        assert c.post("/v1/pipelines/tiny/evict").status_code == 202
        assert c.post("/v1/pipelines/tiny/warm").status_code == 202
        assert wait_for_state(c, "tiny", {"warm", "failed"})["state"] == "warm"
        assert c.delete("/v1/pipelines/tiny").status_code == 204
    assert not loop_blocking_calls, "\n".join(loop_blocking_calls)
