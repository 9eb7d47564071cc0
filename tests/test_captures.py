"""Engine shard sets and compile caches a replica uploads: the node's side (no vLLM).

A real node (uvicorn on loopback) holds a small pipeline; captures are uploaded with the
replica's own client (``loader.captures``) or by hand when a test must send something a replica
never would (a wrong digest, junk, a stale key).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import torch

from api.schema import CaptureKey, capture_id
from clients.errors import ApiError, InsufficientStorageError, NotFoundError
from loader.captures import CaptureClient, CapturePayload, plan_replay, replay_capture
from loader.errors import IntegrityError, SourceError
from loader.sources import HttpRangeSource
from tests.fixtures.metrics import metric_value
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes

TOKENS = {"tok-a": "team-a", "tok-b": "team-b", "tok-ops": "admin"}


class Toy(torch.nn.Module):
    """Stands in for an engine's model: parameters, a tied one, and a buffer."""

    def __init__(self, seed: int | None = None) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(16, 8)
        self.head = torch.nn.Linear(8, 4, bias=False)
        self.register_buffer("scale", torch.ones(()))
        if seed is not None:
            generator = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for tensor in (*self.parameters(), *self.buffers()):
                    tensor.copy_(torch.randn(tensor.shape, generator=generator))


def _model_dir(root: Path, name: str = "src", *, nbytes: int = 4096) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "model.safetensors").write_bytes(safetensors_bytes(nbytes))
    (directory / "config.json").write_text(json.dumps({"model_type": "toy", "name": name}))
    return directory


def _register(client: httpx.Client, pipeline: str, models: dict[str, Path], **extra: Any) -> None:
    body = {"models": [{"name": n, "source": f"file://{p}"} for n, p in models.items()],
            "tp_sizes": [1, 2], **extra}  # TP 2 in full-tensor mode: what captures are for
    answer = client.put(f"/v1/pipelines/{pipeline}", json=body)
    assert answer.status_code in (200, 202), answer.text
    assert wait_for_state(client, pipeline, {"warm", "failed"})["state"] == "warm"


def _key(client: httpx.Client, pipeline: str, *, model: str = "llm", rank: int = 0,
         tp_size: int = 2, **overrides: Any) -> CaptureKey:
    manifest = client.get(f"/v1/pipelines/{pipeline}/manifest",
                          params={"tp_size": tp_size, "rank": rank}).json()
    fields = {
        "kind": "weights", "model": model, "engine": "vllm", "engine_version": "0.32.0",
        "tp_size": tp_size, "rank": rank, "pp_size": 1, "pp_rank": 0, "dtype": "float32",
        "quantization": "none", "device": "cpu-x86_64-avx2",
        "snapshot": manifest["snapshots"][model], "settings": "5" * 64, **overrides,
    }
    return CaptureKey.model_validate(fields)


def _compile_key(client: httpx.Client, pipeline: str, **overrides: Any) -> CaptureKey:
    files = client.get(f"/v1/pipelines/{pipeline}/files").json()["files"]
    config = next(f["blob"] for f in files if f["path"] == "config.json")
    fields = {"kind": "compile_cache", "model": "llm", "engine": "vllm",
              "engine_version": "0.32.0", "tp_size": 1, "device": "cpu-x86_64-avx2",
              "config": config, "settings": "0" * 64, **overrides}
    return CaptureKey.model_validate(fields)


def _payload(seed: int = 1) -> CapturePayload:
    tensors, buffers = Toy(seed).state_dict(), {"scale"}
    return CapturePayload.build(tensors, stage="loaded", buffers=buffers)


def _used(client: httpx.Client) -> int:
    used: int = client.get("/v1/node").json()["used"]
    return used


def _tmp_files(node: RunningNode) -> list[Path]:
    return list((node.settings.data_dir / "tmp").iterdir())


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    with running_node(data_dir=tmp_path / "data", capacity="1GiB", tokens_file=tokens) as node:
        yield node


def test_an_upload_is_verified_stored_listed_and_replayed(
    node: RunningNode, tmp_path: Path
) -> None:
    with node.client("tok-a") as c, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(c, "p", {"llm": _model_dir(tmp_path)})
        before = c.get("/v1/pipelines/p").json()
        used = _used(c)
        key = _key(c, "p")
        assert captures.find(key) is None
        payload = _payload()
        info = captures.upload_payload(key, payload)
        # the node's own digest of the bytes it took, and the chunk digests it serves against
        assert info.id == capture_id(key)
        assert info.blob.sha256 == hashlib.sha256(b"".join(payload.pieces())).hexdigest()
        assert info.bytes == info.blob.size == payload.size
        assert info.stage == "loaded"
        assert {t.name: t.buffer for t in info.tensors} == {
            "proj.weight": False, "proj.bias": False, "head.weight": False, "scale": True}
        assert [s.id for s in captures.list()] == [info.id]
        # charged to the pipeline: in its size, and on the node's disk
        status = c.get("/v1/pipelines/p").json()
        assert status["bytes_total"] == before["bytes_total"] + info.bytes
        assert [s["id"] for s in status["captures"]] == [info.id]
        assert status["captures"][0]["key"]["rank"] == 0
        assert _used(c) == used + info.bytes
        # a replica streams it straight into its model, checked chunk by chunk
        model = Toy()
        destinations = plan_replay(info, model)
        source = HttpRangeSource([node.url], token="tok-a")
        try:
            report = replay_capture(info, destinations, source=source,
                                    device=torch.device("cpu"), pipeline="p", model="llm")
        finally:
            source.close()
        assert report.bytes_delivered == sum(t.length for t in info.tensors)
        assert report.verified_chunks >= 1
        for name, tensor in Toy(1).state_dict().items():
            assert torch.equal(model.state_dict()[name], tensor), name
        # the same key again replaces it: one capture, the old blob freed
        again = captures.upload_payload(key, _payload(seed=2))
        assert [s.id for s in captures.list()] == [info.id]
        assert again.blob.sha256 != info.blob.sha256
        assert c.get(f"/v1/blobs/{info.blob.sha256}").status_code == 404
        assert _used(c) == used + again.bytes
        assert metric_value(c, "weightcache_capture_uploads_total", kind="weights",
                            outcome="stored") == 2


def test_bytes_that_are_not_what_the_sender_declared_are_not_stored(
    node: RunningNode, tmp_path: Path
) -> None:
    with node.client("tok-a") as c, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(c, "p", {"llm": _model_dir(tmp_path)})
        used = _used(c)
        key = _key(c, "p")
        payload = _payload()
        data = b"".join(payload.pieces())
        wrong = hashlib.sha256(data + b"x").hexdigest()
        with pytest.raises(ApiError) as refused:
            captures.upload(key, [data], size=len(data), sha256=wrong)
        assert (refused.value.status, refused.value.code) == (422, "integrity_error")
        assert refused.value.details["actual"] == hashlib.sha256(data).hexdigest()
        # one flipped byte in transit: the digest the sender declared does not match
        flipped = bytearray(data)
        flipped[-1] ^= 0xFF
        with pytest.raises(ApiError, match="integrity_error"):
            captures.upload(key, [bytes(flipped)], size=len(data),
                            sha256=hashlib.sha256(data).hexdigest())
        junk = b"not a safetensors file" * 4
        with pytest.raises(ApiError) as invalid:
            captures.upload(key, [junk], size=len(junk), sha256=hashlib.sha256(junk).hexdigest())
        assert (invalid.value.status, invalid.value.code) == (422, "invalid_capture")
        # a key that is not the pipeline as registered, or an id that is not its key's
        stale = _key(c, "p", snapshot="0" * 64)
        with pytest.raises(ApiError, match="capture_key_mismatch"):
            captures.upload_payload(stale, payload)
        answer = c.put(
            f"/v1/pipelines/p/captures/{'1' * 64}", content=data,
            params={**key.model_dump(mode="json", exclude_none=True),
                    "sha256": hashlib.sha256(data).hexdigest()},
        )
        assert (answer.status_code, answer.json()["error"]["code"]) == (409,
                                                                        "capture_key_mismatch")
        not_a_key = c.put(f"/v1/pipelines/p/captures/{capture_id(key)}", content=data,
                          params={"kind": "weights", "sha256": hashlib.sha256(data).hexdigest()})
        assert not_a_key.status_code == 400, not_a_key.text
        assert captures.list() == []
        assert _used(c) == used
        assert c.get("/v1/node").json()["reserved"] == 0
        # each refusal counted by its code (a malformed key is a bad request, not an upload)
        for code, count in (("integrity_error", 2), ("invalid_capture", 1),
                            ("capture_key_mismatch", 2), ("stored", 0)):
            assert metric_value(c, "weightcache_capture_uploads_total", kind="weights",
                                outcome=code) == count, code
        assert _tmp_files(node) == []


def test_another_tenants_captures_are_404_like_missing_ones(
    node: RunningNode, tmp_path: Path
) -> None:
    with node.client("tok-a") as a, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(a, "p", {"llm": _model_dir(tmp_path)})
        key = _key(a, "p")
        info = captures.upload_payload(key, _payload())
    with node.client("tok-b") as b, CaptureClient(node.url, "p", token="tok-b") as theirs:
        for answer in (
            b.get("/v1/pipelines/p/captures"),
            b.get(f"/v1/pipelines/p/captures/{info.id}"),
            b.delete(f"/v1/pipelines/p/captures/{info.id}"),
            b.get(f"/v1/blobs/{info.blob.sha256}"),
        ):
            assert answer.status_code == 404, answer.text
        with pytest.raises(NotFoundError):
            theirs.upload_payload(key, _payload(seed=3))
        assert theirs.find(key) is None
        # team-b's own pipeline of the very same source is another namespace
        _register(b, "p", {"llm": tmp_path / "src"})
        assert theirs.find(key) is None
        assert theirs.list() == []
    with node.client("tok-ops") as admin:
        listed = admin.get("/v1/pipelines/p/captures", params={"tenant": "team-a"}).json()
        assert [s["id"] for s in listed["captures"]] == [info.id]


def test_captures_are_evicted_and_deleted_with_their_pipeline(
    node: RunningNode, tmp_path: Path
) -> None:
    blob_dir = node.settings.data_dir / "blobs"
    with node.client("tok-a") as c, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(c, "p", {"llm": _model_dir(tmp_path)})
        weights = captures.upload_payload(_key(c, "p"), _payload())
        tarball = b"compiled code" * 100
        compiled = captures.upload(_compile_key(c, "p"), [tarball], size=len(tarball),
                                   sha256=hashlib.sha256(tarball).hexdigest())
        assert compiled.tensors == []
        assert {s.key.kind for s in captures.list()} == {"weights", "compile_cache"}
        paths = [blob_dir / sha[:2] / sha for sha in (weights.blob.sha256, compiled.blob.sha256)]
        assert all(path.exists() for path in paths)
        assert c.post("/v1/pipelines/p/evict").status_code == 202
        status = c.get("/v1/pipelines/p").json()
        assert status["state"] == "evicted"
        assert status["captures"] == []
        assert not any(path.exists() for path in paths)
        assert _used(c) == 0
        # warm again: the files come back, the captures do not (a replica makes them anew)
        _register(c, "p", {"llm": tmp_path / "src"})
        assert c.post("/v1/pipelines/p/warm").status_code == 202
        assert wait_for_state(c, "p", {"warm"})["captures"] == []
        captures.upload_payload(_key(c, "p"), _payload())
        assert c.delete("/v1/pipelines/p").status_code == 204
        assert _used(c) == 0
        assert not any(blob_dir.glob("*/*"))


def test_no_room_for_a_capture_is_507_and_nothing_is_written(tmp_path: Path) -> None:
    payload = _payload()
    source = _model_dir(tmp_path)
    other = _model_dir(tmp_path, "other", nbytes=64 * 1024)
    files = sum(p.stat().st_size for p in source.iterdir())
    held = sum(p.stat().st_size for p in other.iterdir())
    capacity = files + held + payload.size - 1  # everything but one byte of the capture fits
    limits = {"compile_cache_max": "1KiB"}
    with running_node(data_dir=tmp_path / "data", capacity=capacity, captures=limits) as node, \
            node.client() as c, CaptureClient(node.url, "p") as captures:
        # TP 1 only: no shard-set estimate to reserve at registration
        _register(c, "other", {"llm": other}, pinned=True, tp_sizes=[1])  # never evicted
        _register(c, "p", {"llm": source}, tp_sizes=[1])
        used = _used(c)
        with pytest.raises(InsufficientStorageError) as refused:
            captures.upload_payload(_key(c, "p", tp_size=1), payload)
        assert refused.value.code == "insufficient_storage"
        assert captures.list() == []
        assert _used(c) == used
        info = c.get("/v1/node").json()
        assert (info["reserved"], info["temp"]) == (0, 0)
        assert _tmp_files(node) == []
        assert c.get("/v1/pipelines/p").json()["state"] == "warm"
        assert c.get("/v1/pipelines/other").json()["state"] == "warm"
        # over the node's limit for its kind: 413 before a byte is stored
        tarball = b"x" * 1025
        with pytest.raises(ApiError) as too_large:
            captures.upload(_compile_key(c, "p"), [tarball], size=len(tarball),
                            sha256=hashlib.sha256(tarball).hexdigest())
        assert (too_large.value.status, too_large.value.code) == (413, "too_large")
        assert too_large.value.details["limit"] == 1024
        assert _tmp_files(node) == []


def test_a_capture_corrupted_on_the_node_is_caught_on_read_and_dropped(
    node: RunningNode, tmp_path: Path
) -> None:
    with node.client("tok-a") as c, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(c, "p", {"llm": _model_dir(tmp_path)})
        key = _key(c, "p")
        info = captures.upload_payload(key, _payload())
        path = node.settings.data_dir / "blobs" / info.blob.sha256[:2] / info.blob.sha256
        data = bytearray(path.read_bytes())
        data[-3] ^= 0x01  # one bit of the last tensor
        path.write_bytes(bytes(data))
        model = Toy()
        destinations = plan_replay(info, model)
        source = HttpRangeSource([node.url], token="tok-a")
        try:
            with pytest.raises((IntegrityError, SourceError)):
                replay_capture(info, destinations, source=source,
                               device=torch.device("cpu"), pipeline="p", model="llm")
        finally:
            source.close()
        answer = c.get(f"/v1/blobs/{info.blob.sha256}")
        assert answer.status_code == 404  # quarantined: never served again
        assert captures.find(key) is None
        status = c.get("/v1/pipelines/p").json()
        assert status["state"] == "warm"  # a bad capture costs the pipeline nothing
        assert status["captures"] == []
        assert (node.settings.data_dir / "quarantine" / info.blob.sha256).exists()
        assert metric_value(c, "weightcache_captures_dropped_total",
                            reason="failed_verification") == 1


def test_a_reregistration_drops_the_captures_of_the_model_it_changed(
    node: RunningNode, tmp_path: Path
) -> None:
    base, chat = _model_dir(tmp_path, "base"), _model_dir(tmp_path, "chat")
    with node.client("tok-a") as c, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(c, "p", {"base": base, "chat": chat})
        kept = captures.upload_payload(_key(c, "p", model="base"), _payload())
        dropped = captures.upload_payload(_key(c, "p", model="chat"), _payload(seed=2))
        tuned = _model_dir(tmp_path, "chat-tuned")  # same layout, other bytes
        _register(c, "p", {"base": base, "chat": tuned})
        deadline = time.monotonic() + 60
        while c.get("/v1/pipelines/p").json().get("pending") is not None:
            assert time.monotonic() < deadline, "the re-registration never took over"
            time.sleep(0.05)
        assert [s.id for s in captures.list()] == [kept.id]
        assert c.get(f"/v1/blobs/{dropped.blob.sha256}").status_code == 404
        assert c.get(f"/v1/blobs/{kept.blob.sha256}").status_code == 200
        # a replica of the tuned model asks with its own snapshot, and finds nothing
        assert captures.find(_key(c, "p", model="chat")) is None
        # a re-registration without TP 2 drops the TP 2 captures: no engine asks for them now
        _register(c, "p", {"base": base, "chat": tuned}, tp_sizes=[1])
        while c.get("/v1/pipelines/p").json()["tp_sizes"] != [1]:
            assert time.monotonic() < deadline + 60, "the re-registration never took over"
            time.sleep(0.05)
        assert captures.list() == []
        assert c.get(f"/v1/blobs/{kept.blob.sha256}").status_code == 404


def test_a_slot_keeps_its_newest_captures_however_many_keys_are_tried(
    node: RunningNode, tmp_path: Path
) -> None:
    with node.client("tok-a") as c, CaptureClient(node.url, "p", token="tok-a") as captures:
        _register(c, "p", {"llm": _model_dir(tmp_path)})
        used = _used(c)
        stored = [captures.upload_payload(_key(c, "p", engine_version=f"0.{n}.0"), _payload(n))
                  for n in range(1, 5)]
        other_rank = captures.upload_payload(_key(c, "p", rank=1), _payload(9))
        # rank 0 at TP 2 keeps its two newest (WEIGHTCACHE_CAPTURES_PER_SLOT); rank 1 its own
        assert sorted(s.id for s in captures.list()) == sorted(
            [stored[2].id, stored[3].id, other_rank.id])
        for gone in stored[:2]:
            assert c.get(f"/v1/blobs/{gone.blob.sha256}").status_code == 404
        assert _used(c) == used + stored[2].bytes + stored[3].bytes + other_rank.bytes
        assert metric_value(c, "weightcache_captures_dropped_total", reason="superseded") == 2


def _response(connection: socket.socket) -> str:
    """One whole HTTP response (head and Content-Length body) read from ``connection``."""
    connection.settimeout(30)
    received = b""
    while b"\r\n\r\n" not in received:
        received += connection.recv(65536) or b"!"  # "!": closed early, fail below
        assert not received.endswith(b"!"), received
    head, _, body = received.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        more = connection.recv(65536)
        assert more, received
        body += more
    return (head + b"\r\n\r\n" + body).decode()


def test_a_stalled_upload_is_dropped_and_a_tenant_holds_few_uploads_open(
    tmp_path: Path,
) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings = {"upload_idle_s": 1.0, "uploads_per_tenant": 1}
    with running_node(data_dir=tmp_path / "data", capacity="1GiB", tokens_file=tokens,
                      captures=settings) as node, node.client("tok-a") as c:
        _register(c, "p", {"llm": _model_dir(tmp_path)})
        key, payload = _key(c, "p"), _payload()
        data = b"".join(payload.pieces())
        query = urlencode({**key.model_dump(mode="json", exclude_none=True),
                           "sha256": hashlib.sha256(data).hexdigest()})
        host, port = node.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port))) as slow:
            # declares the whole capture, sends 10 bytes, then nothing
            slow.sendall(
                f"PUT /v1/pipelines/p/captures/{capture_id(key)}?{query} HTTP/1.1\r\n"
                f"Host: {host}\r\nAuthorization: Bearer tok-a\r\n"
                f"Content-Length: {len(data)}\r\n\r\n".encode() + data[:10])
            deadline = time.monotonic() + 10
            while c.get("/v1/node").json()["reserved"] == 0:  # its reservation is taken
                assert time.monotonic() < deadline
                time.sleep(0.02)
            # the tenant's one upload slot is taken: another upload is told to come back
            with CaptureClient(node.url, "p", token="tok-a") as captures:
                with pytest.raises(ApiError) as busy:
                    captures.upload_payload(_key(c, "p", rank=1), payload)
                assert (busy.value.status, busy.value.code) == (429, "too_many_uploads")
                answer = _response(slow)  # the node gives up on the stalled one
                assert answer.startswith("HTTP/1.1 408"), answer
                assert "upload_stalled" in answer
                assert c.get("/v1/node").json()["reserved"] == 0
                assert _tmp_files(node) == []
                # and the slot is free again
                assert captures.upload_payload(key, payload).id == capture_id(key)
        assert metric_value(c, "weightcache_capture_uploads_total", kind="weights",
                            outcome="upload_stalled") == 1
