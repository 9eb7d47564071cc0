"""The ``redis_server`` fixture itself: a real server, restartable on its port, with or without
its data, and nothing persisted unless a stop asks for it."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from tests.fixtures.redis_server import RedisServer


def test_restarts_on_the_same_port_with_or_without_its_data(redis_server: RedisServer) -> None:
    port = redis_server.port
    client = redis_server.client()
    assert client.config_get("save") == {"save": ""}  # no snapshots behind the test's back
    assert client.config_get("appendonly") == {"appendonly": "no"}
    client.set("k", "v")
    client.close()

    redis_server.restart(keep_data=True)
    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.get("k") == "v"

    redis_server.restart()  # empty, like a Redis that lost its data
    assert redis_server.port == port
    with redis_server.client() as client:
        assert client.get("k") is None
        client.set("k", "again")

    redis_server.kill()  # SIGKILL: nothing saved
    assert not redis_server.running
    with pytest.raises(redis.ConnectionError), redis_server.client() as client:
        client.ping()
    redis_server.start()
    with redis_server.client() as client:
        assert client.get("k") is None


def test_a_stopped_server_leaves_its_port_and_dir(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "r")
    server.start()
    server.stop()
    assert not server.running
    assert not (tmp_path / "r" / "dump.rdb").exists()
    server.stop()  # twice is fine
