"""Region membership on a real Redis: heartbeats, expiry by TTL, an outage seen and healed."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import pytest
from redis.asyncio import Redis

from cache_node.region import (
    REGION_UNREACHABLE,
    Membership,
    NodeReport,
    RegionKeys,
    RejoinReason,
    open_redis,
)
from tests.fixtures.redis_server import RedisServer, eventually

pytestmark = pytest.mark.anyio

GiB = 1024**3


@asynccontextmanager
async def connected(server: RedisServer) -> AsyncIterator[Redis]:
    redis = open_redis(server.url, timeout_s=0.5)
    try:
        yield redis
    finally:
        await redis.aclose()


def reporting(used: int = GiB, *, capacity: int = 10 * GiB) -> Callable[[], Awaitable[NodeReport]]:
    async def report() -> NodeReport:
        return NodeReport(capacity=capacity, used=used, free=capacity - used)

    return report


def member(
    redis: Redis,
    node_id: str,
    *,
    region: str = "eu-1",
    ttl_s: float = 2.0,
    interval_s: float = 0.1,
    on_rejoin: Callable[[RejoinReason], Awaitable[None]] | None = None,
) -> Membership:
    return Membership(
        redis,
        region=region,
        node_id=node_id,
        url=f"http://{node_id}:8470",
        report=reporting(),
        on_rejoin=on_rejoin,
        ttl_s=ttl_s,
        interval_s=interval_s,
    )


async def test_nodes_register_with_a_ttl_and_are_listed_per_region(
    redis_server: RedisServer,
) -> None:
    async with connected(redis_server) as redis:
        before = time.time()
        async with (
            member(redis, "node-b") as b,
            member(redis, "node-a"),
            member(redis, "node-c", region="us-2"),
        ):
            nodes = await b.live_nodes()
            assert [n.node_id for n in nodes] == ["node-a", "node-b"]
            a = nodes[0]
            assert a.url == "http://node-a:8470"
            assert a.region == "eu-1"
            assert (a.capacity, a.used, a.free) == (10 * GiB, GiB, 9 * GiB)
            assert a.state == "ready"
            assert before <= a.last_heartbeat <= time.time()
            # expiry is Redis's TTL on the record, renewed by every beat
            ttl_ms = await redis.pttl(RegionKeys("eu-1").node("node-a"))
            assert 0 < ttl_ms <= 2000
            other = await member(redis, "x", region="us-2").live_nodes()
            assert [n.node_id for n in other] == ["node-c"]
        # leaving removes the record at once
        assert await b.live_nodes() == []


async def test_a_node_that_stops_beating_expires_and_is_pruned(redis_server: RedisServer) -> None:
    keys = RegionKeys("eu-1")
    async with connected(redis_server) as redis, member(redis, "alive", ttl_s=0.6) as alive:
        gone = member(redis, "gone", ttl_s=0.6)
        await gone.start()
        await gone.stop(leave=False)  # as if killed: no goodbye, the TTL must do it
        assert {n.node_id for n in await alive.live_nodes()} == {"alive", "gone"}

        async def expired() -> bool:
            return {n.node_id for n in await alive.live_nodes()} == {"alive"}

        deadline = time.monotonic() + 5
        while not await expired():
            assert time.monotonic() < deadline, "a node that stopped beating never expired"
            await anyio.sleep(0.05)
        # gone within its TTL (plus a poll), and its id pruned from the region's set
        assert await redis.smembers(keys.nodes) == {"alive"}


async def test_redis_restarted_empty_the_node_says_so_then_registers_again(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    rejoins: list[RejoinReason] = []

    async def on_rejoin(reason: RejoinReason) -> None:
        rejoins.append(reason)

    caplog.set_level(logging.INFO, logger="weightcache.events")
    async with connected(redis_server) as redis, member(redis, "n1", on_rejoin=on_rejoin) as m:
        assert rejoins == ["registered"]
        assert m.reachable
        assert m.readiness_check() is None

        await anyio.to_thread.run_sync(redis_server.stop)
        await eventually(lambda: not m.reachable, timeout_s=5, what="the outage noticed")
        since = m.unreachable_since
        assert since is not None
        assert since <= time.time()
        reason = m.readiness_check()
        assert reason is not None
        assert reason["code"] == REGION_UNREACHABLE == "region_unreachable"
        assert "unreachable" in reason["message"]
        assert reason["since"] == since

        await anyio.to_thread.run_sync(redis_server.start)  # empty: the region forgot n1
        took = await eventually(lambda: m.reachable, timeout_s=5, what="re-registration")
        assert took < 2  # beats every 0.1 s: back within a few of them
        assert [n.node_id for n in await m.live_nodes()] == ["n1"]
        assert rejoins == ["registered", "redis_returned"]
        assert m.readiness_check() is None
    events = [r.getMessage() for r in caplog.records]
    assert "region.unreachable" in events
    assert "region.reachable" in events


async def test_a_record_lost_between_two_beats_is_noticed(redis_server: RedisServer) -> None:
    """Redis restarted (or flushed) so fast that no beat failed: the record's absence tells."""
    rejoins: list[RejoinReason] = []

    async def on_rejoin(reason: RejoinReason) -> None:
        rejoins.append(reason)

    async with connected(redis_server) as redis, member(redis, "n1", on_rejoin=on_rejoin) as m:
        await redis.flushall()
        await eventually(lambda: len(rejoins) == 2, timeout_s=5, what="the rejoin")
        assert rejoins == ["registered", "record_lost"]
        assert m.reachable  # never looked unreachable
        assert [n.node_id for n in await m.live_nodes()] == ["n1"]


async def test_a_failing_rejoin_hook_runs_again_on_the_next_beat(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[RejoinReason] = []

    async def flaky(reason: RejoinReason) -> None:
        calls.append(reason)
        if len(calls) == 1:
            raise RuntimeError("the store was busy")

    caplog.set_level(logging.INFO, logger="weightcache.events")
    async with connected(redis_server) as redis, member(redis, "n1", on_rejoin=flaky):
        await eventually(lambda: len(calls) == 2, timeout_s=5, what="the second try")
        await anyio.sleep(0.3)
        assert calls == ["registered", "registered"]  # and not again once it succeeded
    assert [r.getMessage() for r in caplog.records].count("region.rejoin_failed") == 1


async def test_a_node_started_while_redis_is_down_joins_when_it_comes_up(
    tmp_path: Path,
) -> None:
    server = RedisServer(tmp_path / "redis")  # not started yet
    rejoins: list[RejoinReason] = []

    async def on_rejoin(reason: RejoinReason) -> None:
        rejoins.append(reason)

    try:
        async with connected(server) as redis, member(redis, "n1", on_rejoin=on_rejoin) as m:
            assert not m.reachable  # started anyway: it serves what it holds
            assert m.readiness_check() is not None
            await anyio.to_thread.run_sync(server.start)
            await eventually(lambda: m.reachable, timeout_s=5, what="joining")
            assert rejoins == ["registered"]
            assert [n.node_id for n in await m.live_nodes()] == ["n1"]
    finally:
        server.kill()


async def test_a_record_that_does_not_parse_is_skipped(redis_server: RedisServer) -> None:
    keys = RegionKeys("eu-1")
    async with connected(redis_server) as redis, member(redis, "good") as good:
        await redis.sadd(keys.nodes, "bad")
        await redis.set(keys.node("bad"), "{not json", px=5000)
        assert [n.node_id for n in await good.live_nodes()] == ["good"]


def test_two_beats_must_fit_in_a_ttl() -> None:
    with pytest.raises(ValueError, match="at most half the TTL"):
        Membership(
            Redis(), region="r", node_id="n", url="http://n", report=reporting(),
            ttl_s=1.0, interval_s=0.6,
        )
