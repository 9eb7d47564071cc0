"""Blob locations on a real Redis: added, removed, republished, and dropped with a dead node."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import pytest
from redis.asyncio import Redis

from cache_node.errors import InvalidInput
from cache_node.region import (
    BlobLocations,
    Membership,
    NodeReport,
    RegionKeys,
    RegionUnavailable,
    open_redis,
    rank,
)
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.anyio

REGION = "eu-1"
KEYS = RegionKeys(REGION)


def blob(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


A, B, C, D = (blob(n) for n in "abcd")


@asynccontextmanager
async def locations(server: RedisServer) -> AsyncIterator[tuple[Redis, BlobLocations]]:
    redis = open_redis(server.url, timeout_s=0.5)
    try:
        yield redis, BlobLocations(redis, region=REGION)
    finally:
        await redis.aclose()


def member(redis: Redis, node_id: str) -> Membership:
    async def report() -> NodeReport:
        return NodeReport(capacity=100, used=0, free=100)

    return Membership(redis, region=REGION, node_id=node_id, url=f"http://{node_id}",
                      report=report, ttl_s=30, interval_s=10)


async def test_add_and_remove_keep_both_directions(redis_server: RedisServer) -> None:
    async with locations(redis_server) as (_, where):
        await where.add("n1", [A, B])
        await where.add("n2", [B, C])
        assert await where.holders(A) == {"n1"}
        assert await where.holders(B) == {"n1", "n2"}
        assert await where.held_by("n2") == {B, C}
        await where.remove("n1", [B])
        assert await where.holders(B) == {"n2"}
        assert await where.held_by("n1") == {A}
        await where.add("n1", [])  # nothing to do, no error
        assert await where.holders(D) == set()


async def test_peers_are_live_holders_in_rendezvous_order(redis_server: RedisServer) -> None:
    async with locations(redis_server) as (_, where):
        for node in ("n1", "n2", "n3", "n4"):
            await where.add(node, [A])
        live = {"n1", "n2", "n3", "self"}  # n4 is dead, not yet dropped
        await where.add("self", [A])
        peers = await where.peers(A, live=live, exclude="self")
        assert peers == rank(A, {"n1", "n2", "n3"})
        assert await where.peers(B, live=live) == []


async def test_publish_all_makes_the_region_see_exactly_what_a_node_holds(
    redis_server: RedisServer,
) -> None:
    async with locations(redis_server) as (redis, where):
        await where.add("n1", [A, B])
        await where.add("n2", [A])
        await where.publish_all("n1", [B, C])  # A was evicted while the node was cut off
        assert await where.held_by("n1") == {B, C}
        assert await where.holders(A) == {"n2"}
        assert await where.holders(C) == {"n1"}
        # after an empty restart: everything comes back from the node's own list
        await redis.flushall()
        await where.publish_all("n1", [B, C])
        assert await where.holders(B) == {"n1"}
        assert await redis.smembers(KEYS.holders) == {"n1"}


async def test_a_dead_node_is_dropped_a_live_one_never(redis_server: RedisServer) -> None:
    async with locations(redis_server) as (redis, where):
        live = member(redis, "live")
        await live.start()
        dead = member(redis, "dead")
        await dead.start()
        await where.add("live", [A, B])
        await where.add("dead", [B, C])
        assert await where.drop_node("dead") is None  # its record exists: refused
        assert await where.holders(C) == {"dead"}

        await dead.stop()  # its membership record is gone (left, or expired)
        assert await where.drop_dead() == {"dead": 2}
        assert await where.holders(B) == {"live"}
        assert await where.holders(C) == set()
        assert await where.held_by("dead") == set()
        assert await redis.smembers(KEYS.holders) == {"live"}
        assert not await redis.exists(KEYS.blob(C))  # an empty set is no key at all
        assert await where.drop_dead() == {}  # idempotent
        assert await where.drop_node("live") is None
        await live.stop()


async def test_identifiers_are_allow_listed(redis_server: RedisServer) -> None:
    async with locations(redis_server) as (_, where):
        for bad_blob in ("A" * 64, "a" * 63, "../" + "a" * 61, "a" * 63 + "}"):
            with pytest.raises(InvalidInput):
                await where.add("n1", [bad_blob])
        for bad_node in ("", "n 1", "n}{x", "n:1", "-n"):
            with pytest.raises(InvalidInput):
                await where.add(bad_node, [A])
        with pytest.raises(InvalidInput):
            BlobLocations(_unused_redis(), region="eu{1}")


async def test_redis_down_is_region_unavailable(redis_server: RedisServer) -> None:
    async with locations(redis_server) as (_, where):
        await anyio.to_thread.run_sync(redis_server.stop)
        with pytest.raises(RegionUnavailable):
            await where.holders(A)


def _unused_redis() -> Redis:
    return Redis()
