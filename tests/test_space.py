"""Space for TP shard sets is part of the up-front check (I5), and only physical need counts.

A real node pulls a tiny Llama from a real S3 server (SeaweedFS) through a counting proxy, whose
byte counts are what the origin sent.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import load_file, save_file

from cache_node.shard_space import RANK_HEADER_ALLOWANCE
from clients.seaweed import SeaweedServer
from tests.fixtures.counting_proxy import CountingProxy
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama
from tests.fixtures.weights import safetensors_of_size

KiB = 1024
MiB = 1024 * KiB


def _upload_llama(seaweed: SeaweedServer, bucket: str, tmp_path: Path) -> dict[str, int]:
    source = make_tiny_llama(tmp_path / "llama", num_kv_heads=4, vocab_size=1000, tie=False)
    sizes = {}
    for path in sorted(source.iterdir()):
        seaweed.put(bucket, f"llama/{path.name}", path.read_bytes())
        sizes[path.name] = path.stat().st_size
    return sizes


def _settings(tmp_path: Path, proxy: CountingProxy, seaweed: SeaweedServer, **extra: Any) -> Any:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "alice", "tok-b": "bob"}))
    return {
        "data_dir": tmp_path / "data",
        "tokens_file": tokens,
        "s3": {
            "endpoint_url": proxy.endpoint_url,
            "access_key_id": seaweed.access_key,
            "secret_access_key": seaweed.secret_key,
        },
        "fetch": {"part_size": "1MiB", "backoff_base_s": 0.05},
        "eviction": {"hot_window_s": 0},  # every unpinned pipeline may be evicted
        **extra,
    }


def _llama_body(bucket: str, **extra: Any) -> dict[str, Any]:
    return {"models": [{"name": "llm", "source": f"s3://{bucket}/llama"}], "tp_sizes": [1, 2],
            **extra}


def _filler_body(bucket: str, key: str, **extra: Any) -> dict[str, Any]:
    return {"models": [{"name": "f", "source": f"s3://{bucket}/{key}"}], **extra}


def _evictions(client: httpx.Client) -> float:
    total = 0.0
    for line in client.get("/metrics").text.splitlines():
        if line.startswith("weightcache_evictions_total{"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_files_that_fit_with_shard_sets_that_do_not_are_507_before_any_origin_byte(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    sizes = _upload_llama(seaweed, bucket, tmp_path)
    files = sum(sizes.values())
    weights = sizes["model.safetensors"]
    shard_estimate = weights + 2 * RANK_HEADER_ALLOWANCE
    capacity = files + shard_estimate + 64 * KiB  # the whole pipeline fits an empty node...
    pinned = capacity - files - 50 * KiB  # ...but a pinned pipeline leaves room for files only
    seaweed.put(bucket, "pinned/model.safetensors", safetensors_of_size(pinned))
    settings = _settings(tmp_path, proxy, seaweed, capacity=capacity)
    with running_node(**settings) as node, node.client("tok-a") as c:
        assert c.put("/v1/pipelines/p", json=_filler_body(bucket, "pinned", pinned=True)
                     ).status_code == 202
        assert wait_for_state(c, "p", {"warm", "failed"})["state"] == "warm"
        proxy.reset_counts()

        answer = c.put("/v1/pipelines/llm", json=_llama_body(bucket))
        assert answer.status_code == 507, answer.text
        error = answer.json()["error"]
        assert error["code"] == "insufficient_storage"
        for name in sizes:  # not one origin byte of the model's files
            assert proxy.bytes_sent(f"/{bucket}/llama/{name}") == 0, name
            assert proxy.gets(f"/{bucket}/llama/{name}") == 0, name
        status = c.get("/v1/pipelines/llm").json()
        assert status["state"] == "failed"
        assert status["error"]["code"] == "insufficient_storage"
        assert c.get("/v1/pipelines/p").json()["state"] == "warm"
        info = c.get("/v1/node").json()
        assert info["used"] == pinned
        assert info["reserved"] == 0
        assert info["temp"] == 0
        assert not list((tmp_path / "data" / "tmp").iterdir())


def test_a_second_tenant_on_a_held_model_at_near_full_capacity_evicts_nobody(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    _upload_llama(seaweed, bucket, tmp_path)
    filler = MiB
    seaweed.put(bucket, "filler/model.safetensors", safetensors_of_size(filler))
    with running_node(**_settings(tmp_path, proxy, seaweed, capacity="1GiB")) as node, \
            node.client("tok-a") as alice:
        assert alice.put("/v1/pipelines/llm", json=_llama_body(bucket)).status_code == 202
        status = wait_for_state(alice, "llm", {"warm", "failed"})
        assert status["state"] == "warm"
        assert status["shards"] == {"1": "ready", "2": "ready"}
        model_bytes = alice.get("/v1/node").json()["used"]  # files and the TP 2 shard set

    # The same data dir, now with 64 KiB to spare once a filler pipeline is in.
    capacity = model_bytes + filler + 64 * KiB
    settings = _settings(tmp_path, proxy, seaweed, capacity=capacity)
    with running_node(**settings) as node, node.client("tok-a") as alice, \
            node.client("tok-b") as bob:
        assert alice.put("/v1/pipelines/filler", json=_filler_body(bucket, "filler")
                         ).status_code == 202
        assert wait_for_state(alice, "filler", {"warm", "failed"})["state"] == "warm"
        proxy.reset_counts()

        answer = bob.put("/v1/pipelines/llm", json=_llama_body(bucket))
        assert answer.status_code == 202, answer.text
        status = wait_for_state(bob, "llm", {"warm", "failed"})
        assert status["state"] == "warm", status
        assert status["shards"] == {"1": "ready", "2": "ready"}
        assert alice.get("/v1/pipelines/filler").json()["state"] == "warm"
        assert alice.get("/v1/pipelines/llm").json()["state"] == "warm"
        assert _evictions(alice) == 0
        info = alice.get("/v1/node").json()
        assert info["used"] == model_bytes + filler
        assert info["reserved"] == 0
        # bob's replicas read the same verified shard blobs
        alice_manifest = alice.get("/v1/pipelines/llm/manifest", params={"tp_size": 2, "rank": 1})
        bob_manifest = bob.get("/v1/pipelines/llm/manifest", params={"tp_size": 2, "rank": 1})
        assert alice_manifest.status_code == bob_manifest.status_code == 200
        assert {t["blob"] for t in alice_manifest.json()["tensors"]} == {
            t["blob"] for t in bob_manifest.json()["tensors"]
        }


def test_making_room_never_evicts_the_holder_of_blobs_the_registration_uses(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    llama = make_tiny_llama(models / "llama", num_kv_heads=4, vocab_size=1000)
    (models / "filler").mkdir()
    (models / "filler" / "model.safetensors").write_bytes(safetensors_of_size(MiB))
    (models / "new").mkdir()
    (models / "new" / "model.safetensors").write_bytes(safetensors_of_size(512 * KiB))
    base = {"data_dir": tmp_path / "data", "local_roots": [models],
            "eviction": {"hot_window_s": 0}}
    llama_model = {"name": "llm", "source": f"file://{llama}"}
    with running_node(**base, capacity="1GiB") as node, node.client() as c:
        assert c.put("/v1/pipelines/a", json={"models": [llama_model]}).status_code == 202
        assert wait_for_state(c, "a", {"warm", "failed"})["state"] == "warm"
        held = c.get("/v1/node").json()["used"]

    # Full but for 256 KiB once the filler is in; "a" is the least recently used.
    with running_node(**base, capacity=held + MiB + 256 * KiB) as node, node.client() as c:
        body = {"models": [{"name": "f", "source": f"file://{models / 'filler'}"}]}
        assert c.put("/v1/pipelines/filler", json=body).status_code == 202
        assert wait_for_state(c, "filler", {"warm", "failed"})["state"] == "warm"

        # "b" uses the model "a" holds, plus 512 KiB of its own: room is made, but not by
        # evicting "a", whose blobs "b" would then fetch again.
        body = {"models": [llama_model,
                           {"name": "new", "source": f"file://{models / 'new'}"}]}
        assert c.put("/v1/pipelines/b", json=body).status_code == 202
        assert wait_for_state(c, "b", {"warm", "failed"})["state"] == "warm"
        assert c.get("/v1/pipelines/a").json()["state"] == "warm"
        assert c.get("/v1/pipelines/filler").json()["state"] == "evicted"
        info = c.get("/v1/node").json()
        assert info["used"] == held + 512 * KiB
        assert info["reserved"] == 0


def test_shard_sets_larger_than_the_estimate_fail_before_any_weight_byte(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    # A 2 MiB tensor no rule splits is held whole by every rank: TP 4 shards are then
    # ~6 MiB larger than the weights, which the registration's estimate cannot know.
    source = make_tiny_llama(tmp_path / "llama", num_kv_heads=4, vocab_size=1000, tie=False)
    tensors = load_file(str(source / "model.safetensors"))
    tensors["model.extra_buffer"] = torch.ones(1024, 512)
    save_file(tensors, str(source / "model.safetensors"), metadata={"format": "pt"})
    sizes = {}
    for path in sorted(source.iterdir()):
        seaweed.put(bucket, f"llama/{path.name}", path.read_bytes())
        sizes[path.name] = path.stat().st_size
    files = sum(sizes.values())
    weights = sizes["model.safetensors"]
    capacity = files + weights + 4 * RANK_HEADER_ALLOWANCE + MiB  # the estimate fits
    settings = _settings(tmp_path, proxy, seaweed, capacity=capacity)
    with running_node(**settings) as node, node.client("tok-a") as c:
        proxy.reset_counts()
        body = {"models": [{"name": "llm", "source": f"s3://{bucket}/llama"}], "tp_sizes": [4]}
        assert c.put("/v1/pipelines/llm", json=body).status_code == 202
        status = wait_for_state(c, "llm", {"warm", "failed"})
        assert status["state"] == "failed", status
        assert status["error"]["code"] == "insufficient_storage"
        # only the header was read ahead, not the weights
        assert proxy.bytes_sent(f"/{bucket}/llama/model.safetensors") < 64 * KiB
        info = c.get("/v1/node").json()
        assert info["reserved"] == 0
        assert info["temp"] == 0
