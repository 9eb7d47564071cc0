"""A digest an origin declares is a claim, not proof (I1, I7).

Tenant B points a pipeline at an origin object holding junk that *declares* the sha256 of tenant
A's blob (a ``SHA256SUMS`` line, an S3 ``ChecksumSHA256``, an HF LFS oid). The node must fetch and
verify B's bytes, fail B's pipeline with ``integrity_error``, and never hand B the blob, on the API
or on the data plane; while the legitimate sharing (one tenant, one object, twice) still costs no
origin byte the second time, across restarts too.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from safetensors.numpy import save

from api.data_plane import run_data_plane, stop_data_plane
from clients.seaweed import SeaweedServer
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import RunningNode, free_port, running_node, wait_for_state

TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}


def checkpoint(seed: int, *, rows: int = 512) -> bytes:
    """A small valid safetensors file (so A's pipeline is warm under the strictest checks)."""
    weights = np.random.default_rng(seed).standard_normal((rows, 256)).astype(np.float32)
    return save({"model.embed_tokens.weight": weights})


def junk_like(data: bytes) -> bytes:
    return os.urandom(len(data))


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@contextmanager
def node_with_tenants(tmp_path: Path, **settings: Any) -> Iterator[RunningNode]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    settings.setdefault("data_dir", tmp_path / "data")
    settings.setdefault("fetch", {"part_size": "1MiB", "backoff_base_s": 0.05})
    with running_node(tokens_file=tokens, **settings) as node:
        yield node


def register(node: RunningNode, token: str, pipeline: str, source: str) -> dict[str, Any]:
    with node.client(token) as client:
        body = {"models": [{"name": "m", "source": source}]}
        answer = client.put(f"/v1/pipelines/{pipeline}", json=body)
        assert answer.status_code in (200, 202), answer.text
        return wait_for_state(client, pipeline, {"warm", "failed"})


def assert_b_never_gets(node: RunningNode, blob: str, status: dict[str, Any]) -> None:
    """B's pipeline failed on the junk, and B cannot read A's blob or a manifest naming it."""
    assert status["state"] == "failed", status
    assert status["error"]["code"] == "integrity_error", status["error"]
    with node.client("tok-b") as client:
        assert client.get(f"/v1/blobs/{blob}").status_code == 404
        manifest = client.get("/v1/pipelines/p/manifest", params={"tp_size": 1, "rank": 0})
        assert manifest.status_code == 409, manifest.text
        # the refusal may quote the digest B itself declared ("expected ..."), never list a file
        assert set(manifest.json()) == {"error"}
        assert manifest.json()["error"]["code"] == "not_warm"
    with node.client("tok-a") as client:  # A still reads its own
        assert sha256(client.get(f"/v1/blobs/{blob}").content) == blob


def s3_settings(endpoint: str, seaweed: SeaweedServer) -> dict[str, Any]:
    return {
        "endpoint_url": endpoint,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
    }


def test_sha256sums_naming_another_tenants_blob_is_fetched_and_refused(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    secret = checkpoint(1)
    junk = junk_like(secret)
    blob = sha256(secret)
    seaweed.put(bucket, "a/model.safetensors", secret)
    seaweed.put(bucket, "a/SHA256SUMS", f"{blob}  model.safetensors\n".encode())
    seaweed.put(bucket, "b/model.safetensors", junk)
    seaweed.put(bucket, "b/SHA256SUMS", f"{blob}  model.safetensors\n".encode())
    data_port = free_port()
    with node_with_tenants(
        tmp_path, s3=s3_settings(proxy.endpoint_url, seaweed),
        data_url=f"http://127.0.0.1:{data_port}",
    ) as node:
        assert register(node, "tok-a", "p", f"s3://{bucket}/a")["state"] == "warm"
        status = register(node, "tok-b", "p", f"s3://{bucket}/b")
        # B's bytes were read and checked, not trusted
        assert proxy.bytes_sent(f"/{bucket}/b/model.safetensors") == len(junk)
        assert_b_never_gets(node, blob, status)
        assert [r.sha256 for r in node.node.store.records()] == [blob]  # no junk kept
        workers = run_data_plane(node.settings, port=data_port, workers=1)
        try:
            url = f"http://127.0.0.1:{data_port}/v1/blobs/{blob}"
            denied = httpx.get(url, headers={"Authorization": "Bearer tok-b"}, timeout=30)
            assert denied.status_code == 404
            assert secret not in denied.content
            allowed = httpx.get(url, headers={"Authorization": "Bearer tok-a"}, timeout=30)
            assert allowed.content == secret
        finally:
            stop_data_plane(workers)


def test_forged_s3_checksum_sha256_is_not_proof(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    secret = checkpoint(2)
    junk = junk_like(secret)
    blob = sha256(secret)
    seaweed.put(bucket, "a/model.safetensors", secret, sha256_checksum=True)
    seaweed.put(bucket, "b/model.safetensors", junk)
    # B's S3 server lies: its HEAD declares A's checksum for B's object
    forged = base64.b64encode(bytes.fromhex(blob)).decode()
    proxy.add_fault(Fault(
        match=f"/{bucket}/b/model.safetensors", method="HEAD", times=None,
        set_headers={"x-amz-checksum-sha256": forged, "x-amz-checksum-type": "FULL_OBJECT"},
    ))
    with node_with_tenants(tmp_path, s3=s3_settings(proxy.endpoint_url, seaweed)) as node:
        assert register(node, "tok-a", "p", f"s3://{bucket}/a")["state"] == "warm"
        status = register(node, "tok-b", "p", f"s3://{bucket}/b")
        assert proxy.bytes_sent(f"/{bucket}/b/model.safetensors") == len(junk)
        assert blob in status["error"]["message"]  # the declared digest the bytes did not match
        assert_b_never_gets(node, blob, status)


def test_hf_lfs_oid_claiming_another_repos_blob_is_not_proof(
    tmp_path: Path, hf_hub: FixtureHub
) -> None:
    secret = checkpoint(3)
    junk = junk_like(secret)
    blob = sha256(secret)
    hf_hub.add_repo("org-a/model", {"model.safetensors": secret})
    hf_hub.add_repo("org-b/model", {"model.safetensors": junk},
                    claims={"model.safetensors": blob})
    with node_with_tenants(tmp_path, hf={"endpoint": hf_hub.endpoint}) as node:
        assert register(node, "tok-a", "p", "hf://org-a/model")["state"] == "warm"
        status = register(node, "tok-b", "p", "hf://org-b/model")
        assert hf_hub.bytes_sent("model.safetensors", repo="org-b/model") == len(junk)
        assert_b_never_gets(node, blob, status)


def test_sharing_within_one_scope_costs_no_origin_byte_even_after_a_restart(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    weights = checkpoint(4)
    seaweed.put(bucket, "m/model.safetensors", weights)
    seaweed.put(bucket, "m/SHA256SUMS", f"{sha256(weights)}  model.safetensors\n".encode())
    key = f"/{bucket}/m/model.safetensors"
    settings = {"s3": s3_settings(proxy.endpoint_url, seaweed)}
    with node_with_tenants(tmp_path, **settings) as node:
        assert register(node, "tok-a", "one", f"s3://{bucket}/m")["state"] == "warm"
        assert proxy.bytes_sent(key) == len(weights)
        proxy.reset_counts()
        # a second pipeline of the same tenant, and the first one re-registered
        assert register(node, "tok-a", "two", f"s3://{bucket}/m/")["state"] == "warm"
        with node.client("tok-a") as client:
            client.post("/v1/pipelines/one/evict")
            wait_for_state(client, "one", {"evicted"})
        assert register(node, "tok-a", "one", f"s3://{bucket}/m")["state"] == "warm"
        assert proxy.bytes_sent(key) == 0
    with node_with_tenants(tmp_path, **settings) as node:  # the facts survive a restart
        assert register(node, "tok-a", "three", f"s3://{bucket}/m")["state"] == "warm"
        assert proxy.bytes_sent(key) == 0


def test_facts_go_with_their_blob(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    weights = checkpoint(5)
    seaweed.put(bucket, "m/model.safetensors", weights)
    key = f"/{bucket}/m/model.safetensors"
    with node_with_tenants(tmp_path, s3=s3_settings(proxy.endpoint_url, seaweed)) as node:
        assert register(node, "tok-a", "one", f"s3://{bucket}/m")["state"] == "warm"
        assert len(list(node.node.meta.scan("verified:"))) == 1
        with node.client("tok-a") as client:
            assert client.delete("/v1/pipelines/one").status_code == 204
        assert list(node.node.meta.scan("verified:")) == []
        proxy.reset_counts()
        assert register(node, "tok-a", "one", f"s3://{bucket}/m")["state"] == "warm"
        assert proxy.bytes_sent(key) == len(weights)


def test_a_new_commit_does_not_download_unchanged_weights_again(
    tmp_path: Path, hf_hub: FixtureHub
) -> None:
    weights = checkpoint(6)
    first = hf_hub.add_repo("org/model", {"model.safetensors": weights, "config.json": b"{}"})
    second = hf_hub.add_repo("org/model", {"model.safetensors": weights,
                                           "config.json": b'{"v": 2}'})
    with node_with_tenants(tmp_path, hf={"endpoint": hf_hub.endpoint}) as node:
        assert register(node, "tok-a", "p", f"hf://org/model@{first}")["state"] == "warm"
        assert register(node, "tok-a", "p", f"hf://org/model@{second}")["state"] == "warm"
        assert hf_hub.bytes_sent("model.safetensors", repo="org/model") == len(weights)
