"""Cold-start history: bounded per pipeline, newest first, durable, and tenant-scoped on the API."""

from __future__ import annotations

import json
from pathlib import Path

from api.schema import LoadReport, LoadStages
from cache_node.load_history import LoadHistory, history_key
from cache_node.metadata import DiskcacheKeyValue
from cache_node.metrics import NodeMetrics
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.weights import write_weights


def _report(total: float, **fields: object) -> LoadReport:
    return LoadReport.model_validate(
        {"bytes": 1000, "stages": LoadStages(total=total), "gbps": 1.0, **fields}
    )


def test_history_keeps_the_newest_reports_up_to_its_limit(tmp_path: Path) -> None:
    meta = DiskcacheKeyValue(tmp_path / "meta")
    history = LoadHistory(meta, NodeMetrics(), limit=3)
    for i in range(5):
        stored = history.record("team-a", "chat", _report(float(i)), now=1000.0 + i)
        assert stored.pipeline == "chat"
        assert stored.at == 1000.0 + i
    history.record("team-b", "chat", _report(9.0))
    assert [r.stages.total for r in history.recent("team-a", "chat")] == [4.0, 3.0, 2.0]
    assert [r.stages.total for r in history.recent("team-a", "chat", limit=1)] == [4.0]
    assert [r.stages.total for r in history.recent("team-b", "chat")] == [9.0]
    merged = history.recent_of([("team-a", "chat"), ("team-b", "chat")], limit=2)
    assert [r.stages.total for r in merged][:1] == [9.0]  # stamped now: the newest
    assert len(meta.get(history_key("team-a", "chat"))["loads"]) == 3  # type: ignore[index]
    history.forget("team-a", "chat")
    assert history.recent("team-a", "chat") == []
    meta.close()

    # durable: a new history over the same metadata sees what the old one kept
    reopened = DiskcacheKeyValue(tmp_path / "meta")
    again = LoadHistory(reopened, NodeMetrics()).recent("team-b", "chat")
    assert [r.stages.total for r in again] == [9.0]
    reopened.close()


def test_a_tenant_reports_and_reads_only_its_own_pipelines_loads(tmp_path: Path) -> None:
    model = tmp_path / "models" / "m"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    write_weights(model)
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({"tok-a": "team-a", "tok-b": "team-b", "tok-ops": "admin"}))
    body = {"bytes": 10, "stages": {"total": 0.5}, "gbps": 2.0, "device": "cuda:0"}
    with running_node(
        data_dir=tmp_path / "data", tokens_file=tokens, local_roots=[tmp_path / "models"]
    ) as node, node.client("tok-a") as a, node.client("tok-b") as b, node.client("tok-ops") as ops:
        spec = {"models": [{"name": "m", "source": f"file://{model}"}]}
        assert a.put("/v1/pipelines/chat", json=spec).status_code == 202
        assert wait_for_state(a, "chat", {"warm", "failed"})["state"] == "warm"
        assert a.post("/v1/pipelines/chat/loads", json=body).status_code == 202
        with node.client() as anonymous:
            assert anonymous.post("/v1/pipelines/chat/loads", json=body).status_code == 401
            assert anonymous.get("/v1/loads").status_code == 401
        # another tenant's pipeline is a missing one
        assert b.post("/v1/pipelines/chat/loads", json=body).status_code == 404
        assert b.get("/v1/pipelines/chat/loads").status_code == 404
        assert b.get("/v1/loads").json() == {"loads": []}
        # the admin sees every tenant's, and its report lands in the owner's history
        assert ops.post("/v1/pipelines/chat/loads", json={**body, "rank": 0}).status_code == 202
        mine = a.get("/v1/pipelines/chat/loads").json()["loads"]
        assert [entry["device"] for entry in mine] == ["cuda:0", "cuda:0"]
        assert len(a.get("/v1/loads").json()["loads"]) == 2
        assert len(ops.get("/v1/loads").json()["loads"]) == 2
