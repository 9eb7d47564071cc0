"""The sendfile data plane: a real node, two real worker processes on one port, real HTTP."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file, save_file

from api.data_plane import run_data_plane, stop_data_plane
from loader import load
from tests.fixtures.node_server import RunningNode, free_port, running_node, wait_for_state

TOKENS = {"tok-alpha": "alpha", "tok-beta": "beta", "tok-admin": "admin"}


@dataclass
class Plane:
    node: RunningNode
    data_url: str
    root: Path

    def blob_of(self, pipeline: str, token: str) -> tuple[str, bytes]:
        """The (only) safetensors blob of a pipeline, and the source bytes it must hold."""
        with self.node.client(token) as client:
            files = client.get(f"/v1/pipelines/{pipeline}/files").json()["files"]
        (entry,) = [f for f in files if f["path"].endswith(".safetensors")]
        return entry["blob"], (self.root / pipeline / entry["path"]).read_bytes()

    def get(self, blob: str, token: str | None = "tok-alpha", **headers: str) -> httpx.Response:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.get(f"{self.data_url}/v1/blobs/{blob}", headers=headers, timeout=30)


def _make_model(directory: Path, seed: int) -> None:
    directory.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    tensors = {
        "model.embed_tokens.weight": torch.randn(256, 128, generator=generator).bfloat16(),
        "model.norm.weight": torch.randn(128, generator=generator),
        "lm_head.weight": torch.randn(256, 128, generator=generator).half(),
    }
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "unknown-arch"}')


def _register(node: RunningNode, token: str, pipeline: str, source: Path) -> None:
    with node.client(token) as client:
        answer = client.put(
            f"/v1/pipelines/{pipeline}",
            json={"models": [{"name": "llm", "source": f"file://{source}"}]},
        )
        assert answer.status_code == 202, answer.text
        assert wait_for_state(client, pipeline, {"warm", "failed"})["state"] == "warm"


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    root = tmp_path_factory.mktemp("data_plane")
    tokens = root / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    for seed, name in enumerate(("shared", "corrupt", "late")):
        _make_model(root / name, seed)
    port = free_port()
    data_url = f"http://127.0.0.1:{port}"
    with running_node(
        data_dir=root / "data",
        capacity="1GiB",
        tokens_file=tokens,
        local_roots=[root],
        data_url=data_url,
    ) as node:
        _register(node, "tok-alpha", "shared", root / "shared")
        _register(node, "tok-alpha", "corrupt", root / "corrupt")
        workers = run_data_plane(node.settings, port=port, workers=2)
        try:
            yield Plane(node=node, data_url=data_url, root=root)
        finally:
            stop_data_plane(workers)
    assert all(worker.returncode is not None for worker in workers)


def test_ranges_are_exact(plane: Plane) -> None:
    blob, source = plane.blob_of("shared", "tok-alpha")
    size = len(source)
    assert hashlib.sha256(source).hexdigest() == blob

    whole = plane.get(blob)
    assert whole.status_code == 200
    assert whole.content == source
    assert whole.headers["etag"] == f'"{blob}"'
    assert whole.headers["accept-ranges"] == "bytes"
    assert int(whole.headers["content-length"]) == size
    assert "content-range" not in whole.headers

    for header, start, end in [
        ("bytes=0-0", 0, 1),
        (f"bytes={size - 1}-", size - 1, size),
        ("bytes=-7", size - 7, size),
        ("bytes=1000-70000", 1000, 70001),
        (f"bytes=5-{size + 100}", 5, size),
    ]:
        part = plane.get(blob, Range=header)
        assert part.status_code == 206, header
        assert part.content == source[start:end], header
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}", header
        assert part.headers["etag"] == f'"{blob}"'

    past = plane.get(blob, Range=f"bytes={size}-")
    assert past.status_code == 416
    assert past.headers["content-range"] == f"bytes */{size}"
    assert past.json()["error"]["code"] == "range_not_satisfiable"

    head = httpx.head(
        f"{plane.data_url}/v1/blobs/{blob}", headers={"Authorization": "Bearer tok-alpha"}
    )
    assert head.status_code == 200
    assert int(head.headers["content-length"]) == size
    assert httpx.get(f"{plane.data_url}/healthz").json() == {"status": "ok"}


def test_tenants(plane: Plane) -> None:
    blob, source = plane.blob_of("shared", "tok-alpha")
    missing = plane.get(blob, token=None)
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["error"]["code"] == "unauthorized"
    assert plane.get(blob, token="tok-nobody").status_code == 401
    other = plane.get(blob, token="tok-beta")  # alpha's blob does not exist for beta (I7)
    assert other.status_code == 404
    assert other.json()["error"]["code"] == "not_found"
    admin = plane.get(blob, token="tok-admin")
    assert admin.status_code == 200
    assert admin.content == source
    # A digest no pipeline references is missing even for the admin; a malformed one is a 400.
    assert plane.get("ab" * 32, token="tok-admin").status_code == 404
    assert plane.get("not-a-digest", token="tok-admin").json()["error"]["code"] == "invalid_input"


def test_a_new_pipeline_is_served_at_once(plane: Plane) -> None:
    shared, _ = plane.blob_of("shared", "tok-alpha")
    assert plane.get(shared, Range="bytes=0-0").status_code == 206  # every index is built
    _register(plane.node, "tok-beta", "late", plane.root / "late")
    blob, source = plane.blob_of("late", "tok-beta")
    for _ in range(4):  # whichever worker answers, its index learns the new pipeline
        answer = plane.get(blob, token="tok-beta")
        assert answer.status_code == 200
        assert answer.content == source
    assert plane.get(blob, token="tok-alpha").status_code == 404


def test_a_flipped_byte_is_a_502_and_quarantines(plane: Plane) -> None:
    blob, source = plane.blob_of("corrupt", "tok-alpha")
    # The workers that answer verify and remember the chunk: the flip must void that memo.
    for _ in range(4):
        assert plane.get(blob, Range="bytes=0-99").content == source[:100]
    path = plane.node.settings.data_dir / "blobs" / blob[:2] / blob
    with open(path, "r+b") as handle:
        handle.seek(len(source) // 2)
        handle.write(bytes([source[len(source) // 2] ^ 0xFF]))

    answer = plane.get(blob, Range="bytes=0-99")
    assert answer.status_code == 502
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["code"] == "integrity_error"
    # The worker only reads the store: the node, which owns it, carries out the quarantine,
    # so its accounting and the pipeline's state follow (the pipeline goes cold and re-warms).
    node = plane.node.node
    deadline = time.monotonic() + 10
    while (plane.node.settings.data_dir / "quarantine" / blob).is_file() is False:
        assert time.monotonic() < deadline, "the node never quarantined the blob"
        time.sleep(0.05)
    assert node.metrics.registry.get_sample_value(
        "weightcache_digest_mismatches_total", {"stage": "read"}
    ) == 1
    usage = node.store.usage()
    assert usage.committed == sum(r.size for r in node.store.records())
    assert plane.get(blob).status_code in (404, 200)  # gone, or already fetched again
    with plane.node.client("tok-alpha") as client:
        status = wait_for_state(client, "corrupt", {"warm", "failed"})
        assert status["state"] == "warm", status  # re-warmed from the origin
    assert plane.get(blob).content == source


def test_load_reads_through_the_advertised_data_plane(plane: Plane) -> None:
    node = plane.node
    with node.client("tok-alpha") as client:
        assert client.get("/v1/node").json()["data_url"] == plane.data_url
    metrics = node.node.metrics.registry
    served_by_api = metrics.get_sample_value("weightcache_bytes_served_total") or 0.0

    result = load("shared", url=node.url, token="tok-alpha", request_size=4096, workers=4)

    expected = load_file(str(plane.root / "shared" / "model.safetensors"))
    assert result.tensors.keys() == expected.keys()
    for name, tensor in expected.items():
        assert result.tensors[name].dtype == tensor.dtype
        assert torch.equal(result.tensors[name], tensor), name
    assert result.report.stream.requests > 4
    # Not one byte went through the API's own blob route.
    assert (metrics.get_sample_value("weightcache_bytes_served_total") or 0.0) == served_by_api


def test_a_second_data_plane_on_the_same_port_is_refused(plane: Plane) -> None:
    # Its workers would join the first one's SO_REUSEPORT group and answer half the requests.
    port = int(plane.data_url.rsplit(":", 1)[1])
    with pytest.raises(RuntimeError, match="cannot serve the data plane"):
        run_data_plane(plane.node.settings, port=port, workers=1)
