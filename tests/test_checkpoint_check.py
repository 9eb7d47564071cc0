"""Nothing is warm that cannot be loaded: bad weights fail the warm, and a load of them fails.

Real origins (the fixture HF hub, SeaweedFS) and a real node; ``weightcache load`` runs as the
CLI does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import httpx
import pytest

from clients.cli import main as cli_main
from clients.seaweed import SeaweedServer
from loader.errors import NoWeightsError
from loader.loading import load
from tests.fixtures.counting_proxy import CountingProxy
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes

CONFIG = b'{"model_type": "llama"}'


def _raw_safetensors(header: dict[str, Any], data: bytes) -> bytes:
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body + data


def _index(weight_map: dict[str, str]) -> bytes:
    return json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}).encode()


def _u8(name: str, nbytes: int) -> bytes:
    data = os.urandom(nbytes)
    return _raw_safetensors(
        {name: {"dtype": "U8", "shape": [nbytes], "data_offsets": [0, nbytes]}}, data
    )


GOOD = safetensors_bytes(4096)
#: repo → (files, expected code, a file the message must name)
BAD_CHECKPOINTS: dict[str, tuple[dict[str, bytes], str, str]] = {
    "garbage": ({"model.safetensors": os.urandom(4096), "config.json": CONFIG},
                "invalid_checkpoint", "model.safetensors"),
    "truncated": ({"model.safetensors": GOOD[:-100], "config.json": CONFIG},
                  "invalid_checkpoint", "model.safetensors"),
    # a consistent header whose spans run 1000 bytes past the end of the file
    "spans-past-end": (
        {
            "model.safetensors": _raw_safetensors(
                {"w": {"dtype": "U8", "shape": [2000], "data_offsets": [0, 2000]}},
                os.urandom(1000),
            ),
            "config.json": CONFIG,
        },
        "invalid_checkpoint",
        "model.safetensors",
    ),
    "index-missing-file": (
        {
            "model-00001-of-00002.safetensors": _u8("a", 64),
            "model.safetensors.index.json": _index(
                {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
            ),
            "config.json": CONFIG,
        },
        "invalid_checkpoint",
        "model-00002-of-00002.safetensors",
    ),
    "index-missing-tensor": (
        {
            "model-00001-of-00001.safetensors": _u8("a", 64),
            "model.safetensors.index.json": _index(
                {"a": "model-00001-of-00001.safetensors", "z": "model-00001-of-00001.safetensors"}
            ),
            "config.json": CONFIG,
        },
        "invalid_checkpoint",
        "'z'",
    ),
    "sharded-index-in-a-folder": (
        {
            "unet/diffusion_pytorch_model-00001-of-00002.safetensors": _u8("a", 64),
            "unet/diffusion_pytorch_model.safetensors.index.json": _index(
                {"a": "diffusion_pytorch_model-00001-of-00002.safetensors",
                 "b": "diffusion_pytorch_model-00002-of-00002.safetensors"}
            ),
        },
        "invalid_checkpoint",
        "diffusion_pytorch_model-00002-of-00002.safetensors",
    ),
    "config-only": ({"config.json": CONFIG, "tokenizer.json": b"{}"}, "no_weights", "no weights"),
    "bin-only": ({"pytorch_model.bin": os.urandom(4096), "config.json": CONFIG},
                 "no_weights", "pytorch_model.bin"),
    "no-tensors": ({"model.safetensors": _raw_safetensors({}, b""), "config.json": CONFIG},
                   "no_weights", "no tensors"),
}


def _hub_node(tmp_path: Path, hub: FixtureHub) -> Any:
    return running_node(
        data_dir=tmp_path / "data",
        capacity="1GiB",
        hf={"endpoint": hub.endpoint},
        fetch={"part_size": "1MiB", "backoff_base_s": 0.05},
    )


def _load_cli(url: str, pipeline: str) -> int:
    return cli_main(["--url", url, "load", pipeline, "--device", "cpu"])


def _scrape(client: httpx.Client, name: str, **labels: str) -> float:
    wanted = ",".join(f'{k}="{v}"' for k, v in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(prefix):
            return float(line.split()[-1])
    return 0.0


def test_bad_checkpoints_from_the_hub_fail_and_do_not_load(
    tmp_path: Path, hf_hub: FixtureHub, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    for name, (files, _, _) in BAD_CHECKPOINTS.items():
        hf_hub.add_repo(f"bad/{name}", files)
    caplog.set_level(logging.WARNING, logger="weightcache.events")
    with _hub_node(tmp_path, hf_hub) as node, node.client() as c:
        for name in BAD_CHECKPOINTS:
            body = {"models": [{"name": "m", "source": f"hf://bad/{name}"}]}
            assert c.put(f"/v1/pipelines/{name}", json=body).status_code == 202
        for name, (_, code, named) in BAD_CHECKPOINTS.items():
            status = wait_for_state(c, name, {"warm", "failed"})
            assert status["state"] == "failed", (name, status)
            error = status["error"]
            assert error["code"] == code, (name, error)
            assert named in error["message"], (name, error)
            assert error["retry_at"] is None, (name, error)
            assert "person" in error["action"], (name, error)
            answer = c.get(f"/v1/pipelines/{name}/manifest", params={"tp_size": 1, "rank": 0})
            assert answer.status_code == 409
            assert answer.json()["error"]["reason"] == code
            # a replica's load exits non-zero and says why
            capsys.readouterr()
            assert _load_cli(node.url, name) != 0, name
            assert code in capsys.readouterr().err, name
        # decided from the file list: the .bin-only source sent no weight bytes
        assert hf_hub.requests("pytorch_model.bin", repo="bad/bin-only") == 0
        invalid = sum(1 for _, code, _ in BAD_CHECKPOINTS.values() if code == "invalid_checkpoint")
        assert _scrape(c, "weightcache_invalid_checkpoints_total",
                       code="invalid_checkpoint") == invalid
        assert _scrape(c, "weightcache_warm_failures_total", code="no_weights") == 3
    failed = [r for r in caplog.records if r.getMessage() == "warm.failed"]
    codes = {getattr(r, "event_fields", {}).get("pipeline"): getattr(r, "event_fields", {})
             .get("code") for r in failed}
    assert codes == {name: code for name, (_, code, _) in BAD_CHECKPOINTS.items()}


def test_a_good_sharded_checkpoint_still_warms_and_loads(
    tmp_path: Path, hf_hub: FixtureHub
) -> None:
    files = {
        "model-00001-of-00002.safetensors": _u8("a", 256),
        "model-00002-of-00002.safetensors": _u8("b", 128),
        "model.safetensors.index.json": _index(
            {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
        ),
        "config.json": CONFIG,
    }
    hf_hub.add_repo("good/sharded", files)
    with _hub_node(tmp_path, hf_hub) as node, node.client() as c:
        body = {"models": [{"name": "m", "source": "hf://good/sharded"}]}
        c.put("/v1/pipelines/good", json=body)
        assert wait_for_state(c, "good", {"warm", "failed"})["state"] == "warm"
        assert _load_cli(node.url, "good") == 0
        result = load("good", url=node.url)
        assert sorted(result.tensors) == ["a", "b"]


def test_bad_checkpoints_from_s3_fail(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    cases = {
        "garbage": ({"model.safetensors": os.urandom(2048), "config.json": CONFIG},
                    "invalid_checkpoint"),
        "truncated": ({"model.safetensors": GOOD[:-1], "config.json": CONFIG},
                      "invalid_checkpoint"),
        "config-only": ({"config.json": CONFIG}, "no_weights"),
        "good": ({"model.safetensors": GOOD, "config.json": CONFIG}, "warm"),
    }
    for name, (files, _) in cases.items():
        for path, data in files.items():
            seaweed.put(bucket, f"{name}/{path}", data)
        sums = "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in files.items())
        seaweed.put(bucket, f"{name}/SHA256SUMS", sums.encode())
    s3 = {
        "endpoint_url": proxy.endpoint_url,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
    }
    with running_node(data_dir=tmp_path / "d", s3=s3) as node, node.client() as c:
        for name in cases:
            body = {"models": [{"name": "m", "source": f"s3://{bucket}/{name}"}]}
            c.put(f"/v1/pipelines/{name}", json=body)
        for name, (_, expected) in cases.items():
            status = wait_for_state(c, name, {"warm", "failed"})
            if expected == "warm":
                assert status["state"] == "warm", status
                assert _load_cli(node.url, name) == 0
            else:
                assert status["state"] == "failed", status
                assert status["error"]["code"] == expected, status
                assert _load_cli(node.url, name) != 0


def test_a_load_that_would_deliver_no_tensors_is_an_error() -> None:
    """The loader's own guard: a manifest without tensors never "loads" (the node refuses to
    warm such a pipeline, so the node here is a stand-in answering what an older one would)."""
    manifest = {"pipeline": "p", "tp_size": 1, "rank": 0, "bytes_total": 2,
                "files": [{"model": "m", "path": "config.json", "blob": "0" * 64, "size": 2}],
                "tensors": []}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/leases"):
            return httpx.Response(200, json={"lease_id": "l1", "expires_at": 1e12})
        if request.url.path.endswith("/manifest"):
            return httpx.Response(200, json=manifest)
        return httpx.Response(204)

    with httpx.Client(transport=httpx.MockTransport(answer)) as http, pytest.raises(
        NoWeightsError, match="no tensors"
    ):
        load("p", url="http://node", http=http)


def test_a_header_gone_bad_on_disk_is_fetched_again_not_called_invalid(tmp_path: Path) -> None:
    source = tmp_path / "models" / "m"
    source.mkdir(parents=True)
    (source / "model.safetensors").write_bytes(GOOD)
    (source / "config.json").write_bytes(CONFIG)
    spec = {"models": [{"name": "m", "source": f"file://{source}"}]}
    with running_node(data_dir=tmp_path / "data") as node, node.client() as c:
        c.put("/v1/pipelines/first", json=spec)
        assert wait_for_state(c, "first", {"warm", "failed"})["state"] == "warm"
        blob = hashlib.sha256(GOOD).hexdigest()
        path = tmp_path / "data" / "blobs" / blob[:2] / blob
        damaged = bytearray(path.read_bytes())
        damaged[9] ^= 0xFF  # inside the JSON header: unparsable as it is on disk
        path.write_bytes(bytes(damaged))
        os.utime(path, ns=(0, path.stat().st_mtime_ns + 1_000_000_000))
        c.put("/v1/pipelines/second", json=spec)  # finds the blob here, checks it
        assert wait_for_state(c, "second", {"warm", "failed"})["state"] == "warm"
        assert path.read_bytes() == GOOD  # quarantined and fetched again
        assert (tmp_path / "data" / "quarantine" / blob).exists()
        assert wait_for_state(c, "first", {"warm", "failed"})["state"] == "warm"
