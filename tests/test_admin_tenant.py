"""Admin addresses one tenant's pipeline when two tenants use the same id (``?tenant=``).

Without ``?tenant=`` an id several tenants use is a 409 ``ambiguous_pipeline`` for admin, never
one picked at random; with it, every pipeline endpoint acts on that tenant's pipeline only.
Anyone else may name only its own tenant (another is a 404, like a missing pipeline).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save

from clients import Client
from clients.cli import main
from clients.errors import EXIT_REFUSED
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state

TOKENS = {"tok-a": "team-a", "tok-b": "team-b", "tok-ops": "admin"}


def _model(directory: Path, seed: int) -> Path:
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    weights = rng.standard_normal((64, 32)).astype(np.float32)
    (directory / "model.safetensors").write_bytes(save({"model.norm.weight": weights}))
    (directory / "config.json").write_text(json.dumps({"model_type": "x", "seed": seed}))
    return directory


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    with running_node(data_dir=tmp_path / "data", tokens_file=tokens) as running:
        for token, seed in (("tok-a", 1), ("tok-b", 2)):
            source = _model(tmp_path / f"models-{seed}", seed)
            with running.client(token) as client:
                body = {"models": [{"name": "m", "source": f"file://{source}"}]}
                assert client.put("/v1/pipelines/p", json=body).status_code == 202
                assert wait_for_state(client, "p", {"warm", "failed"})["state"] == "warm"
        yield running


def _config_blob(client: httpx.Client, tenant: str) -> str:
    files = client.get("/v1/pipelines/p/files", params={"tenant": tenant}).json()["files"]
    (config,) = [f["blob"] for f in files if f["path"] == "config.json"]
    return str(config)


def test_an_id_two_tenants_use_is_ambiguous_for_admin(node: RunningNode) -> None:
    with node.client("tok-ops") as admin:
        for method, path in (
            ("GET", "/v1/pipelines/p"),
            ("GET", "/v1/pipelines/p/manifest"),
            ("GET", "/v1/pipelines/p/files"),
            ("POST", "/v1/pipelines/p/warm"),
            ("POST", "/v1/pipelines/p/evict"),
            ("POST", "/v1/pipelines/p/leases"),
            ("DELETE", "/v1/pipelines/p"),
        ):
            answer = admin.request(method, path)
            assert answer.status_code == 409, (method, path, answer.text)
            error = answer.json()["error"]
            assert error["code"] == "ambiguous_pipeline"
            assert error["tenants"] == ["team-a", "team-b"]
        # nothing happened to either
        for token in ("tok-a", "tok-b"):
            with node.client(token) as client:
                assert client.get("/v1/pipelines/p").json()["state"] == "warm"


def test_admin_names_the_tenant_with_a_query_parameter(node: RunningNode) -> None:
    with node.client("tok-ops") as admin:
        for tenant, token in (("team-a", "tok-a"), ("team-b", "tok-b")):
            status = admin.get("/v1/pipelines/p", params={"tenant": tenant}).json()
            assert status["tenant"] == tenant
            with node.client(token) as own:
                assert _config_blob(admin, tenant) == _config_blob(own, tenant)
            manifest = admin.get("/v1/pipelines/p/manifest", params={"tenant": tenant})
            assert manifest.status_code == 200
            assert manifest.json()["pipeline"] == "p"
        lease = admin.post("/v1/pipelines/p/leases", params={"tenant": "team-b"})
        assert lease.status_code == 201
        with node.client("tok-b") as b:
            assert b.get("/v1/pipelines/p").json()["active_leases"] == 1
        assert admin.delete(
            f"/v1/leases/{lease.json()['lease_id']}", params={"tenant": "team-b"}
        ).status_code == 204
        assert admin.post("/v1/pipelines/p/evict", params={"tenant": "team-b"}).status_code == 202
        with node.client("tok-a") as a, node.client("tok-b") as b:
            assert a.get("/v1/pipelines/p").json()["state"] == "warm"
            assert b.get("/v1/pipelines/p").json()["state"] == "evicted"
        assert admin.post("/v1/pipelines/p/warm", params={"tenant": "team-b"}).status_code == 202
        with node.client("tok-b") as b:
            assert wait_for_state(b, "p", {"warm", "failed"})["state"] == "warm"
        listed = admin.get("/v1/pipelines", params={"tenant": "team-a"}).json()["pipelines"]
        assert [(p["tenant"], p["id"]) for p in listed] == [("team-a", "p")]
        assert admin.delete("/v1/pipelines/p", params={"tenant": "team-a"}).status_code == 204
        # one left: no longer ambiguous
        assert admin.get("/v1/pipelines/p").json()["tenant"] == "team-b"
        assert admin.get("/v1/pipelines/p", params={"tenant": "nobody"}).status_code == 404
        # registering on a tenant's behalf makes the pipeline that tenant's
        source = admin.get("/v1/pipelines/p").json()["models"][0]["source"]
        body = {"models": [{"name": "m", "source": source}]}
        made = admin.put("/v1/pipelines/q", json=body, params={"tenant": "team-a"})
        assert made.status_code == 202
        assert made.json()["tenant"] == "team-a"
        with node.client("tok-a") as a:
            assert a.get("/v1/pipelines/q").json()["tenant"] == "team-a"


def test_others_may_name_only_their_own_tenant(node: RunningNode) -> None:
    with node.client("tok-a") as a:
        assert a.get("/v1/pipelines/p", params={"tenant": "team-a"}).json()["tenant"] == "team-a"
        for method, path in (("GET", "/v1/pipelines/p"), ("GET", "/v1/pipelines"),
                             ("DELETE", "/v1/pipelines/p"), ("POST", "/v1/pipelines/p/evict"),
                             ("GET", "/v1/pipelines/p/manifest")):
            answer = a.request(method, path, params={"tenant": "team-b"})
            assert answer.status_code == 404, (method, path, answer.text)
    with node.client("tok-b") as b:
        assert b.get("/v1/pipelines/p").json()["state"] == "warm"


def test_sdk_and_cli_pass_the_tenant(node: RunningNode, capsys: pytest.CaptureFixture[str]) -> None:
    with Client(node.url, token="tok-ops", tenant="team-b") as client:
        assert client.status("p").tenant == "team-b"
    base = ["--url", node.url, "--token", "tok-ops"]
    assert main([*base, "status", "p", "--json"]) == EXIT_REFUSED  # ambiguous: refused by the node
    assert "ambiguous_pipeline" in capsys.readouterr().err
    assert main([*base, "--tenant", "team-a", "status", "p", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tenant"] == "team-a"
    assert main([*base, "--tenant", "team-a", "evict", "p"]) == 0
    capsys.readouterr()
    with node.client("tok-a") as a, node.client("tok-b") as b:
        assert a.get("/v1/pipelines/p").json()["state"] == "evicted"
        assert b.get("/v1/pipelines/p").json()["state"] == "warm"
