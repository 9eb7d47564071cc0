"""A real full disk never wedges the node (I5): a small tmpfs of the test's own, filled for real.

Two ways to run out: the filesystem is smaller than ``--capacity`` (the reservation must see it
and answer 507 before a byte), and another process eats the space while a fill is writing (the
fill fails with ``insufficient_storage``, its partial goes, and the node records it, keeps
serving, says ``disk_full`` on ``/readyz`` and recovers when space frees).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from clients.seaweed import SeaweedServer
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.metrics import metric_value
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.small_fs import fill_up, small_filesystem
from tests.fixtures.weights import safetensors_of_size

MiB = 1024 * 1024


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    with small_filesystem(tmp_path / "disk", "64m") as mount:
        yield mount


class _Events(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.names: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.names.append(record.getMessage())


@pytest.fixture
def events() -> Iterator[list[str]]:
    """The names of the structured events the node logs meanwhile."""
    logger = logging.getLogger("weightcache.events")
    handler = _Events()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield handler.names
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _temps(data_dir: Path) -> list[str]:
    return sorted(p.name for p in (data_dir / "tmp").iterdir())


def _blobs_on_disk(data_dir: Path) -> int:
    return sum(p.stat().st_size for p in (data_dir / "blobs").rglob("*") if p.is_file())


def test_filesystem_smaller_than_capacity_is_507_not_a_wedged_node(
    tmp_path: Path, small_disk: Path
) -> None:
    models = tmp_path / "models"
    (models / "big").mkdir(parents=True)
    (models / "big" / "model.safetensors").write_bytes(safetensors_of_size(100 * MiB))
    (models / "small").mkdir()
    small = safetensors_of_size(2 * MiB)
    (models / "small" / "model.safetensors").write_bytes(small)
    data_dir = small_disk / "data"
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "capacity": "1GiB",  # a promise the 64 MiB filesystem cannot keep
        "local_roots": [models],
    }
    with running_node(**settings) as node, node.client() as c:
        answer = c.put("/v1/pipelines/big",
                       json={"models": [{"name": "m", "source": f"file://{models / 'big'}"}]})
        assert answer.status_code == 507, answer.text
        assert answer.json()["error"]["code"] == "insufficient_storage"
        status = c.get("/v1/pipelines/big").json()
        assert status["state"] == "failed"
        assert status["error"]["code"] == "insufficient_storage"
        assert "filesystem of the data dir" in status["error"]["message"]
        assert _temps(data_dir) == []
        assert _blobs_on_disk(data_dir) == 0
        info = c.get("/v1/node").json()
        assert info["free"] < 64 * MiB  # what the filesystem has, not what --capacity says
        assert info["used"] == 0
        assert info["reserved"] == 0
        assert c.get("/healthz").status_code == 200

        assert c.delete("/v1/pipelines/big").status_code == 204
        body = {"models": [{"name": "m", "source": f"file://{models / 'small'}"}]}
        assert c.put("/v1/pipelines/small", json=body).status_code == 202
        assert wait_for_state(c, "small", {"warm", "failed"})["state"] == "warm"
        assert c.get("/readyz").status_code == 200

    with running_node(**settings) as node, node.client() as c:  # a restart works
        assert c.get("/readyz").status_code == 200
        assert c.get("/v1/pipelines/small").json()["state"] == "warm"
        (file,) = c.get("/v1/pipelines/small/files").json()["files"]
        assert c.get(f"/v1/blobs/{file['blob']}").content == small


def test_a_filler_process_eating_the_disk_mid_fill_fails_the_fill_cleanly(
    tmp_path: Path,
    small_disk: Path,
    seaweed: SeaweedServer,
    bucket: str,
    proxy: CountingProxy,
    events: list[str],
) -> None:
    model = safetensors_of_size(24 * MiB)
    seaweed.put(bucket, "big/model.safetensors", model)
    other = safetensors_of_size(MiB)
    seaweed.put(bucket, "other/model.safetensors", other)
    data_dir = small_disk / "data"
    settings: dict[str, Any] = {
        "data_dir": data_dir,
        "capacity": "1GiB",
        "s3": {
            "endpoint_url": proxy.endpoint_url,
            "access_key_id": seaweed.access_key,
            "secret_access_key": seaweed.secret_key,
        },
        "fetch": {"part_size": "4MiB", "backoff_base_s": 0.05, "negative_cache_s": 0},
    }
    big = {"models": [{"name": "m", "source": f"s3://{bucket}/big"}]}
    filler = small_disk / "filler.bin"
    with running_node(**settings) as node, node.client() as c:
        # a pipeline that is warm before the disk fills must keep serving
        other_body = {"models": [{"name": "m", "source": f"s3://{bucket}/other"}]}
        assert c.put("/v1/pipelines/other", json=other_body).status_code == 202
        assert wait_for_state(c, "other", {"warm", "failed"})["state"] == "warm"
        (other_file,) = c.get("/v1/pipelines/other/files").json()["files"]

        # The origin holds its bytes back a while: the reservation is made (202), then another
        # process takes the whole disk before the first byte lands.
        proxy.add_fault(Fault(match="/big/model.safetensors", times=None, delay_s=2.0))
        assert c.put("/v1/pipelines/big", json=big).status_code == 202
        fill_up(filler)
        status = wait_for_state(c, "big", {"warm", "failed"})
        assert status["state"] == "failed", status
        assert status["error"]["code"] == "insufficient_storage"
        assert "disk full" in status["error"]["message"]
        assert _temps(data_dir) == []  # the partial and its journal are gone
        proxy.clear_faults()

        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert ready.json()["status"] == "degraded"
        assert "disk_full" in [r["code"] for r in ready.json()["reasons"]]
        assert metric_value(c, "weightcache_disk_full_total") >= 1
        assert "disk.full" in events

        # still serving, still accounting, still taking deletions while the disk is full
        assert c.get(f"/v1/blobs/{other_file['blob']}").content == other
        info = c.get("/v1/node").json()
        assert info["used"] == _blobs_on_disk(data_dir) == len(other)
        assert info["reserved"] == 0
        assert c.delete("/v1/pipelines/big").status_code == 204
        refused = c.put("/v1/pipelines/big", json=big)  # no room: a 507, not a 500
        assert refused.status_code == 507, refused.text
        fill_up(small_disk / "filler2.bin")  # and the room the node gave back goes too

    with running_node(**settings) as node, node.client() as c:  # a restart on a full disk
        ready = c.get("/readyz")
        assert ready.status_code == 503
        assert "disk_full" in [r["code"] for r in ready.json()["reasons"]]
        assert c.get(f"/v1/blobs/{other_file['blob']}").content == other
        assert c.get("/v1/pipelines/big").json()["state"] == "failed"
        assert c.delete("/v1/pipelines/big").status_code == 204

        filler.unlink()  # space frees: ready again, and the fill succeeds
        (small_disk / "filler2.bin").unlink()
        assert c.get("/readyz").status_code == 200
        assert c.put("/v1/pipelines/big", json=big).status_code == 202
        assert wait_for_state(c, "big", {"warm", "failed"})["state"] == "warm"

    with running_node(**settings) as node, node.client() as c:  # a restart works
        assert c.get("/readyz").status_code == 200
        for pipeline in ("other", "big"):
            assert c.get(f"/v1/pipelines/{pipeline}").json()["state"] == "warm"
        info = c.get("/v1/node").json()
        assert info["used"] == _blobs_on_disk(data_dir) == len(model) + len(other)
