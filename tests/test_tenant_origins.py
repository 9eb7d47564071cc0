"""Origins per tenant: allowed source prefixes and each tenant's own credentials (I7).

The tokens file gives a tenant the prefixes it may register and the credentials its origin
requests use. A source outside them is a 403 before anything is recorded or fetched; prefixes
match whole path segments of the parsed source. Single flight and the verified-object facts are
per credential scope, so another tenant with other credentials holding the same bytes downloads
and verifies them once, then shares.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import httpx
import pytest

from api.data_plane import run_data_plane, stop_data_plane
from cache_node.access import load_access
from clients.seaweed import SeaweedServer
from tests.fixtures.counting_proxy import CountingProxy
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import (
    CLOSED_ENDPOINT,
    RunningNode,
    free_port,
    running_node,
    wait_for_state,
)
from tests.test_declared_digests import checkpoint, sha256

HF_SECRET = "hf_team_a_secret_0123456789"


def s3_creds(endpoint: str, seaweed: SeaweedServer, *, secret: str | None = None) -> dict[str, str]:
    return {
        "endpoint_url": endpoint,
        "access_key_id": seaweed.access_key,
        "secret_access_key": secret or seaweed.secret_key,
    }


def write_tokens(tmp_path: Path, config: object) -> Path:
    path = tmp_path / "tokens.json"
    path.write_text(json.dumps(config))
    return path


def put(node: RunningNode, token: str, pipeline: str, source: str) -> Any:
    with node.client(token) as client:
        return client.put(
            f"/v1/pipelines/{pipeline}", json={"models": [{"name": "m", "source": source}]}
        )


def test_sources_outside_the_tenants_prefixes_are_403_before_anything_happens(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "models"
    for name in ("a", "a-evil", "b"):
        (root / name / "m").mkdir(parents=True)
        (root / name / "m" / "config.json").write_text("{}")
    os.symlink(root / "b" / "m", root / "a" / "link-to-b")
    tokens = write_tokens(tmp_path, {
        "tokens": {"tok-a": "team-a", "tok-free": "team-free"},
        "tenants": {"team-a": {
            "sources": ["s3://bucket-a/", "hf://org-a/", f"file://{root}/a/"],
        }},
    })
    with running_node(data_dir=tmp_path / "data", tokens_file=tokens, local_roots=[root]) as node:
        refused = [
            "s3://bucket-ab/m",
            "s3://bucket-b/m",
            "s3://BUCKET-A/m",
            "s3://bucket-b/bucket-a/m",
            "hf://org-a-evil/m",
            "hf://org/m",
            "hf://ORG-A/m",
            "hf://org-b/org-a",
            f"file://{root}/a-evil/m",
            f"file://{root}/b/m",
            f"file://{root}/a/link-to-b",  # a symlink out of the allowed dir
            "file:///etc",
        ]
        malformed = [
            "s3://bucket-a/../bucket-b/m",
            "s3://bucket-a/%2e%2e/x",
            "s3://bucket-a/m/%2E%2E/%2E%2E/x",
            "hf://org-a/../org-b/m",
            "hf://org-a%2Fx/m",
            f"file://{root}/a/../b/m",
            f"file://{root}/a/%2e%2e/b/m",
        ]
        caplog.set_level(logging.INFO, logger="weightcache.events")
        for source in refused:
            answer = put(node, "tok-a", "p", source)
            assert answer.status_code == 403, (source, answer.text)
            assert answer.json()["error"]["code"] == "source_not_allowed", source
        for source in malformed:  # never reach the prefix check: refused as malformed
            assert put(node, "tok-a", "p", source).status_code == 400, source
        with node.client("tok-a") as client:
            assert client.get("/v1/pipelines").json() == {"pipelines": []}  # nothing recorded
        assert list(node.node.registry.all()) == []
        refusals = [r for r in caplog.records if r.getMessage() == "source.refused"]
        assert len(refusals) >= len(refused)
        for allowed in ("s3://bucket-a/m", "s3://bucket-a", "hf://org-a/m", "hf://org-a/m@main",
                        f"file://{root}/a/m"):
            assert put(node, "tok-a", "ok", allowed).status_code in (200, 202), allowed
        # a tenant without a policy may use any source the node accepts, as before
        assert put(node, "tok-free", "ok", "s3://bucket-b/m").status_code == 202
        assert put(node, "tok-free", "ok2", f"file://{root}/b/m").status_code == 202


def test_each_tenant_uses_its_own_credentials(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy,
    hf_hub: FixtureHub, caplog: pytest.LogCaptureFixture,
) -> None:
    weights = checkpoint(11)
    seaweed.put(bucket, "m/model.safetensors", weights)
    private_weights = checkpoint(12)
    hf_hub.add_repo("org-a/private", {"model.safetensors": private_weights}, private=True,
                    token=HF_SECRET)
    wrong_secret = "wrong-secret-" + "x" * 20
    tokens = write_tokens(tmp_path, {
        "tokens": {"tok-a": "team-a", "tok-b": "team-b"},
        "tenants": {
            "team-a": {"hf": {"token": HF_SECRET, "endpoint": hf_hub.endpoint},
                       "s3": s3_creds(proxy.endpoint_url, seaweed)},
            "team-b": {"hf": {"endpoint": hf_hub.endpoint},
                       "s3": s3_creds(proxy.endpoint_url, seaweed, secret=wrong_secret)},
        },
    })
    caplog.set_level(logging.INFO, logger="weightcache")
    # the node's own origins are closed ports: only the tenants' settings can work
    with running_node(data_dir=tmp_path / "data", tokens_file=tokens,
                      fetch={"part_size": "1MiB", "backoff_base_s": 0.05}) as node:
        assert node.settings.s3.endpoint_url == CLOSED_ENDPOINT
        for source in (f"s3://{bucket}/m", "hf://org-a/private"):
            assert put(node, "tok-a", "p", source).status_code == 202
            with node.client("tok-a") as client:
                assert wait_for_state(client, "p", {"warm", "failed"})["state"] == "warm"
            assert put(node, "tok-b", "p", source).status_code == 202
            with node.client("tok-b") as client:
                status = wait_for_state(client, "p", {"warm", "failed"})
            # B's credentials are refused by the origin; A's warm copy is no way around that
            assert status["state"] == "failed", status
            assert status["error"]["code"] == "unauthorized", status
        # the data plane reads the same tokens file: A's blob is A's alone there too
        blob = sha256(private_weights)  # what A's pipeline "p" holds now
        data_port = free_port()
        workers = run_data_plane(node.settings, port=data_port, workers=1)
        try:
            for token, expected in (("tok-a", 200), ("tok-b", 404)):
                answer = httpx.get(f"http://127.0.0.1:{data_port}/v1/blobs/{blob}", timeout=30,
                                   headers={"Authorization": f"Bearer {token}"})
                assert answer.status_code == expected, token
        finally:
            stop_data_plane(workers)
        texts = [json.dumps(status), caplog.text]
        texts += [p.read_bytes().decode("latin-1") for p in (tmp_path / "data" / "meta").rglob("*")
                  if p.is_file()]
        for text in texts:
            for secret in (HF_SECRET, wrong_secret, seaweed.secret_key):
                assert secret not in text


def test_another_scope_with_the_same_bytes_verifies_once_then_shares(
    tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy
) -> None:
    weights = checkpoint(13)
    seaweed.put(bucket, "m/model.safetensors", weights)
    seaweed.put(bucket, "m/SHA256SUMS", f"{sha256(weights)}  model.safetensors\n".encode())
    key = f"/{bucket}/m/model.safetensors"
    with CountingProxy(seaweed.endpoint_url) as proxy_b:
        tokens = write_tokens(tmp_path, {
            "tokens": {"tok-a": "team-a", "tok-b": "team-b"},
            "tenants": {
                "team-a": {"s3": s3_creds(proxy.endpoint_url, seaweed)},
                "team-b": {"s3": s3_creds(proxy_b.endpoint_url, seaweed)},  # another scope
            },
        })
        with running_node(data_dir=tmp_path / "data", tokens_file=tokens,
                          fetch={"part_size": "1MiB", "backoff_base_s": 0.05}) as node:
            source = f"s3://{bucket}/m"
            for token in ("tok-a", "tok-b"):
                assert put(node, token, "one", source).status_code == 202
                with node.client(token) as client:
                    assert wait_for_state(client, "one", {"warm", "failed"})["state"] == "warm"
            assert proxy.bytes_sent(key) == len(weights)
            assert proxy_b.bytes_sent(key) == len(weights)  # B verified its own bytes once
            assert len(list(node.node.store.records())) == 1  # and stored them once
            proxy.reset_counts()
            proxy_b.reset_counts()
            for token in ("tok-a", "tok-b"):
                assert put(node, token, "two", source).status_code == 202
                with node.client(token) as client:
                    assert wait_for_state(client, "two", {"warm", "failed"})["state"] == "warm"
            assert proxy.bytes_sent(key) == proxy_b.bytes_sent(key) == 0


def test_tokens_file_shapes(tmp_path: Path) -> None:
    plain = write_tokens(tmp_path, {"tok-a": "team-a", "tok-ops": "admin"})
    config = load_access(plain)
    assert config.tokens == {"tok-a": "team-a", "tok-ops": "admin"}
    assert config.tenants == {}
    inline = write_tokens(tmp_path, {
        "tok-a": {"tenant": "team-a", "sources": ["hf://org-a/"], "hf_token": "hf_x"},
        "tok-a2": {"tenant": "team-a", "sources": ["hf://org-a/"], "hf_token": "hf_x"},
        "tok-b": "team-b",
    })
    config = load_access(inline)
    assert config.tokens == {"tok-a": "team-a", "tok-a2": "team-a", "tok-b": "team-b"}
    assert set(config.tenants) == {"team-a"}
    bad_files: list[tuple[object, str]] = [
        (
            {"tokens": {"t": "a"}, "tenants": {"a": {"sources": ["ftp://x/"]}}},
            "tenant 'a': source prefix 'ftp://x/' must be",
        ),
        (
            {"tokens": {"t": "a"}, "tenants": {"a": {"sources": ["hf://org-a@main/"]}}},
            "tenant 'a': source prefix 'hf://org-a@main/' must be",
        ),
        (
            {"tokens": {"t": "a"}, "tenants": {"a": {"unknown": 1}}},
            "tenant 'a': unknown keys ['unknown']",
        ),
        (
            {"tokens": {"t": "a"}, "tenants": {"a": {"s3": {"secret_access_key": 5}}}},
            "tenant 'a': 's3' takes string fields",
        ),
        (
            {"t": {"tenant": "a", "sources": ["hf://x/"]}, "u": {"tenant": "a", "sources": []}},
            "token #2: tenant 'a' has two different policies",
        ),
        ({"tokens": {"t": ""}}, "token #1: the tenant must be a non-empty string"),
        (["t", "a"], "tokens file must be a JSON object"),
    ]
    for bad, reason in bad_files:
        path = write_tokens(tmp_path, bad)
        with pytest.raises(ValueError, match=re.escape(reason)) as caught:
            load_access(path)
        assert "hf_x" not in str(caught.value)


def test_tenant_local_roots_must_lie_inside_the_nodes(tmp_path: Path) -> None:
    from cache_node.access import TenantAccess
    from cache_node.settings import NodeSettings

    tokens = write_tokens(tmp_path, {"tokens": {"t": "team"},
                                     "tenants": {"team": {"local_roots": ["/etc"]}}})
    with pytest.raises(ValueError, match="--local-root"):
        TenantAccess(NodeSettings(data_dir=tmp_path / "d", tokens_file=tokens,
                                  local_roots=[tmp_path / "models"]))


@pytest.mark.parametrize(
    ("prefix", "source", "allowed"),
    [
        ("s3://bucket-a/", "s3://bucket-a/m", True),
        ("s3://bucket-a/", "s3://bucket-a", True),
        ("s3://bucket-a/", "s3://bucket-ab/m", False),
        ("s3://bucket-a/models/", "s3://bucket-a/models/llama", True),
        ("s3://bucket-a/models", "s3://bucket-a/models/llama", True),
        ("s3://bucket-a/models/", "s3://bucket-a/models-evil/llama", False),
        ("s3://bucket-a/models/", "s3://bucket-a/other", False),
        ("s3://bucket-a/models/", "s3://bucket-a", False),
        ("s3://bucket-a/", "s3://Bucket-a/m", False),
        ("hf://org-a/", "hf://org-a/m", True),
        ("hf://org-a/", "hf://org-a/m@main", True),
        ("hf://org-a/", "hf://org-a", False),  # a repo named "org-a", not the namespace
        ("hf://org-a/", "hf://org-a-evil/m", False),
        ("hf://org-a/", "hf://Org-A/m", False),
        ("hf://org-a/model", "hf://org-a/model", True),
        ("hf://org-a/model", "hf://org-a/model-evil", False),
        ("hf://", "hf://anyone/m", True),
        ("hf://", "s3://bucket/m", False),
        ("file:///srv/a/", "file:///srv/a/m", True),
        ("file:///srv/a/", "file:///srv/ab/m", False),
    ],
)
def test_prefix_matching_is_by_whole_segments(
    tmp_path: Path, prefix: str, source: str, allowed: bool
) -> None:
    from api.schema import ModelSpec
    from cache_node.access import TenantAccess
    from cache_node.errors import SourceNotAllowed
    from cache_node.settings import NodeSettings

    tokens = write_tokens(tmp_path, {"tokens": {"t": "team"},
                                     "tenants": {"team": {"sources": [prefix]}}})
    access = TenantAccess(NodeSettings(data_dir=tmp_path / "d", tokens_file=tokens,
                                       local_roots=[Path("/srv")]))
    model = ModelSpec(name="m", source=source)
    if allowed:
        access.check_source("team", model, pipeline="p")
    else:
        with pytest.raises(SourceNotAllowed):
            access.check_source("team", model, pipeline="p")


def test_a_tenants_missing_s3_profile_fails_as_unauthorized(tmp_path: Path) -> None:
    tokens = write_tokens(tmp_path, {"tokens": {"t": "team"},
                                     "tenants": {"team": {"s3": {"profile": "no-such-profile"}}}})
    with running_node(data_dir=tmp_path / "data", tokens_file=tokens) as node:
        assert put(node, "t", "p", "s3://bucket/m").status_code == 202
        with node.client("t") as client:
            status = wait_for_state(client, "p", {"warm", "failed"})
        assert status["state"] == "failed"
        assert status["error"]["code"] == "unauthorized", status["error"]
        assert "no-such-profile" in status["error"]["message"]
