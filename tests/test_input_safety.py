"""Hostile input: ids, sources, paths and bodies get a 4xx, never a 500 or a file outside."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.node_server import RunningNode, running_node, wait_for_state
from tests.fixtures.weights import write_weights


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    root = tmp_path_factory.mktemp("safety")
    with running_node(data_dir=root / "data", local_roots=[root / "models"]) as running:
        yield running


BAD_IDS = ["..", "a..b", ".hidden", "a/b", "%2e%2e", "%252e%252e", "a%00b", "x" * 200, "-x"]


@pytest.mark.parametrize("pipeline_id", BAD_IDS)
def test_bad_pipeline_ids_are_4xx(node: RunningNode, pipeline_id: str) -> None:
    body = {"models": [{"name": "m", "source": "hf://org/model"}]}
    with node.client() as c:
        for method, path, payload in (
            ("PUT", f"/v1/pipelines/{pipeline_id}", body),
            ("GET", f"/v1/pipelines/{pipeline_id}", None),
            ("GET", f"/v1/pipelines/{pipeline_id}/manifest", None),
            ("DELETE", f"/v1/pipelines/{pipeline_id}", None),
        ):
            answer = c.request(method, path, json=payload)  # None: no body
            assert 400 <= answer.status_code < 500, (method, path, answer.status_code)
            assert "error" in answer.json()


BAD_SOURCES = [
    "file:///etc/../etc/passwd",
    "file:///etc",
    "file://remote-host/x",
    "hf://../../etc",
    "hf://org/repo@../../x",
    "s3://bucket/../x",
    "s3://",
    "ftp://example/x",
    "hf://org/re\x00po",
    "",
]


@pytest.mark.parametrize("source", BAD_SOURCES)
def test_bad_sources_are_400_and_nothing_is_recorded(node: RunningNode, source: str) -> None:
    with node.client() as c:
        answer = c.put("/v1/pipelines/p", json={"models": [{"name": "m", "source": source}]})
        assert answer.status_code in (400, 422), (source, answer.text)
        assert answer.json()["error"]["code"] == "invalid_input"
        assert c.get("/v1/pipelines/p").status_code == 404


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"models": []},
        {"models": [{"name": "m"}]},
        {"models": [{"name": "m", "source": "hf://o/r"}], "tp_sizes": [3]},
        {"models": [{"name": "m", "source": "hf://o/r"}], "tp_sizes": [0]},
        {"models": [{"name": "m", "source": "hf://o/r"}, {"name": "m", "source": "hf://o/s"}]},
        {"models": [{"name": "../m", "source": "hf://o/r"}]},
        {"models": [{"name": "m", "source": "hf://o/r", "extra": 1}]},
        {"models": "nope"},
    ],
)
def test_bad_bodies_are_4xx(node: RunningNode, body: object) -> None:
    with node.client() as c:
        answer = c.put("/v1/pipelines/p", json=body)
        assert answer.status_code in (400, 422), answer.text
        assert answer.json()["error"]["code"] == "invalid_input"


def test_malformed_json_and_blob_ids(node: RunningNode) -> None:
    with node.client() as c:
        answer = c.put(
            "/v1/pipelines/p", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert answer.status_code == 422
        for blob in ("../../etc/passwd", "ABC", "0" * 63, "g" * 64, "%2e%2e%2fmeta"):
            assert 400 <= c.get(f"/v1/blobs/{blob}").status_code < 500
        assert c.get("/v1/pipelines/p/manifest", params={"tp_size": "x"}).status_code == 422
        assert c.delete("/v1/leases/..%2f..").status_code == 404


def test_local_source_outside_the_local_roots_is_refused(node: RunningNode) -> None:
    with node.client() as c:
        answer = c.put(
            "/v1/pipelines/p", json={"models": [{"name": "m", "source": "file:///usr/lib"}]}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["reason"] == "outside_local_roots"
        data_dir = node.settings.data_dir
        answer = c.put(
            "/v1/pipelines/p", json={"models": [{"name": "m", "source": f"file://{data_dir}"}]}
        )
        assert answer.status_code == 400
        assert answer.json()["error"]["reason"] == "data_dir"
        assert c.get("/v1/pipelines/p").status_code == 404  # nothing recorded


def test_symlinks_in_a_local_source_are_not_followed(node: RunningNode, tmp_path: Path) -> None:
    models = node.settings.local_roots[0] / "linked"
    models.mkdir(parents=True)
    secret = tmp_path / "secret.json"
    secret.write_text('{"secret": true}')
    os.symlink(secret, models / "config.json")
    (models / "tokenizer.json").write_text("{}")
    write_weights(models)
    with node.client() as c:
        body = {"models": [{"name": "m", "source": f"file://{models}"}]}
        c.put("/v1/pipelines/linked", json=body)
        status = wait_for_state(c, "linked", {"warm", "failed"})
        assert status["state"] == "warm"
        files = c.get("/v1/pipelines/linked/files").json()["files"]
        assert [f["path"] for f in files] == ["model.safetensors", "tokenizer.json"]
