"""Region-wide single flight on a real Redis: one leader, fencing tokens, takeover after a crash,
stale leaders refused, bounded waiting."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis

from cache_node.errors import OriginError, error_headers
from cache_node.region import (
    FlightTimeout,
    Lease,
    LeaseLost,
    RegionError,
    RegionFlight,
    RegionKeys,
    RegionUnavailable,
    open_redis,
)
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.anyio

REPO = Path(__file__).resolve().parents[1]

# A leader in a process of its own, so that the test can kill -9 it mid-flight.
LEADER = """
import asyncio, sys
from cache_node.region import RegionFlight, open_redis

async def main() -> None:
    url, key, ttl = sys.argv[1], sys.argv[2], float(sys.argv[3])
    flight = RegionFlight(open_redis(url), region="eu-1", holder="doomed", lease_ttl_s=ttl)

    async def work(lease):
        print(lease.token, flush=True)
        await asyncio.sleep(3600)
        return {}

    await flight.run(key, work, timeout_s=60)

asyncio.run(main())
"""


@asynccontextmanager
async def nodes(
    server: RedisServer, count: int, **options: Any
) -> AsyncIterator[list[RegionFlight]]:
    """``count`` nodes' flights, each on a client (and connections) of its own."""
    async with AsyncExitStack() as stack:
        flights = []
        for i in range(count):
            redis = open_redis(server.url, timeout_s=0.5)
            stack.push_async_callback(redis.aclose)
            flights.append(RegionFlight(redis, region="eu-1", holder=f"node-{i}", **options))
        yield flights


async def test_of_many_contenders_exactly_one_leads(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 8) as flights:
        last_token = 0
        for round_ in range(20):
            key = f"blob-{round_}"
            leases = await asyncio.gather(*(f.acquire(key, ttl_s=5) for f in flights))
            held = [lease for lease in leases if lease is not None]
            assert len(held) == 1, f"round {round_}: {len(held)} leaders"
            (lease,) = held
            assert lease.token > last_token  # fencing tokens only grow
            last_token = lease.token
            current = await flights[0].current(key)
            assert current is not None
            assert (current.token, current.holder) == (lease.token, lease.holder)
            assert 0 < current.ttl_s <= 5
        # a released lease is free at once, and the next one fences the old one out
        winner = next(f for f in flights if f.holder == lease.holder)
        assert await winner.release(lease)
        again = await flights[0].acquire(lease.key, ttl_s=5)
        assert again is not None
        assert again.token > lease.token
        assert not await winner.check(lease)
        assert await flights[0].check(again)


async def test_a_crashed_leaders_lease_expires_and_another_takes_over(
    redis_server: RedisServer,
) -> None:
    ttl_s = 0.8
    leader = await asyncio.create_subprocess_exec(
        sys.executable, "-c", LEADER, redis_server.url, "blob-x", str(ttl_s),
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert leader.stdout is not None
        doomed_token = int(await asyncio.wait_for(leader.stdout.readline(), 30))
        async with nodes(redis_server, 1) as (survivor,):
            # alive, it renews: still the leader after more than one TTL
            await asyncio.sleep(ttl_s * 1.5)
            current = await survivor.current("blob-x")
            assert current is not None
            assert (current.holder, current.token) == ("doomed", doomed_token)

            leader.kill()  # SIGKILL: no release, no goodbye
            await leader.wait()
            calls: list[Lease] = []

            async def work(lease: Lease) -> dict[str, Any]:
                calls.append(lease)
                return {"node": "node-0"}

            start = time.monotonic()
            result = await survivor.run("blob-x", work, timeout_s=10)
            took = time.monotonic() - start
    finally:
        if leader.returncode is None:
            leader.kill()
            await leader.wait()
    assert result.ok
    assert result.holder == "node-0"
    assert len(calls) == 1
    assert calls[0].token > doomed_token
    # it waited for the dead leader's lease to run out (renewed a third of a TTL before at
    # most), and no longer than that plus a poll
    assert ttl_s / 3 < took < ttl_s + 1.0


async def test_a_leader_dead_before_its_first_renewal_blocks_for_one_ttl(
    redis_server: RedisServer,
) -> None:
    """The lease carries its TTL from the start: a holder that dies at once is no exception."""
    async with nodes(redis_server, 2) as (a, b):
        lease = await a.acquire("blob-t", ttl_s=0.4)  # then a dies: it never renews
        assert lease is not None
        current = await b.current("blob-t")
        assert current is not None
        assert 0 < current.ttl_s <= 0.4
        assert await b.acquire("blob-t", ttl_s=5) is None
        await asyncio.sleep(0.5)
        taken = await b.acquire("blob-t", ttl_s=5)
        assert taken is not None
        assert taken.token > lease.token


async def test_a_stale_leader_is_refused_at_commit(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 3) as (a, b, c):
        stale = await a.acquire("k", ttl_s=0.3)
        assert stale is not None
        await asyncio.sleep(0.45)  # A stalls (a pause, a partition) past its TTL
        assert not await a.check(stale)
        fresh = await b.acquire("k", ttl_s=5)
        assert fresh is not None
        assert fresh.token > stale.token
        waiter = asyncio.create_task(c.wait("k", timeout_s=5))
        await asyncio.sleep(0.05)

        with pytest.raises(LeaseLost) as lost:
            await a.commit(stale, {"from": "a"})
        assert lost.value.code == "lease_lost"
        assert lost.value.http_status == 409
        with pytest.raises(LeaseLost):
            await a.renew(stale)
        assert not await a.release(stale)
        with pytest.raises(LeaseLost):
            await a.fail(stale, {"code": "origin_error", "message": "late"})
        assert await b.check(fresh)  # nothing the stale leader did touched the new lease
        assert await a.result("k") is None  # and nothing of it was published

        result = await b.commit(fresh, {"from": "b"})
        assert await asyncio.wait_for(waiter, 5) == result
        kept = await a.result("k")
        assert kept is not None
        assert (kept.holder, kept.token, kept.detail) == ("node-1", fresh.token, {"from": "b"})


async def test_waiters_get_the_leaders_outcome_by_pubsub(redis_server: RedisServer) -> None:
    # Polls 10 s apart: only the published message can end the waits within the assertion.
    async with nodes(redis_server, 4, poll_s=10.0) as flights:
        calls: list[str] = []

        async def work(lease: Lease) -> dict[str, Any]:
            calls.append(lease.holder)
            await asyncio.sleep(0.3)
            return {"node": lease.holder, "size": 123}

        start = time.monotonic()
        results = await asyncio.gather(*(f.run("blob-y", work, timeout_s=20) for f in flights))
        took = time.monotonic() - start
        assert len(calls) == 1
        assert all(r == results[0] for r in results)
        assert results[0].ok
        assert results[0].detail == {"node": calls[0], "size": 123}
        assert took < 3
        # the outcome is kept: a node asking now has it without any work
        again = await flights[2].run("blob-y", work, timeout_s=5)
        assert again == results[0]
        assert len(calls) == 1


async def test_a_failure_is_published_and_kept_briefly(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 2, failure_ttl_s=0.5) as (a, b):
        go = asyncio.Event()
        calls = 0

        async def failing(lease: Lease) -> dict[str, Any]:
            nonlocal calls
            calls += 1
            await go.wait()
            raise OriginError("origin answered 503", status=503)

        leader = asyncio.create_task(a.run("blob-z", failing, timeout_s=5))
        await asyncio.sleep(0.1)
        waiter = asyncio.create_task(b.run("blob-z", failing, timeout_s=5))
        await asyncio.sleep(0.1)
        go.set()
        with pytest.raises(OriginError):
            await leader
        seen = await waiter
        assert not seen.ok
        assert seen.detail["code"] == "origin_error"
        assert seen.detail["origin_status"] == 503
        # kept briefly: the region does not hammer the origin again at once
        assert (await b.run("blob-z", failing, timeout_s=5)) == seen
        assert calls == 1
        await asyncio.sleep(0.6)

        async def working(lease: Lease) -> dict[str, Any]:
            return {"node": lease.holder}

        retried = await b.run("blob-z", working, timeout_s=5)
        assert retried.ok
        assert retried.token > seen.token


async def test_a_leader_that_loses_its_lease_stops_its_work(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 1, lease_ttl_s=0.3) as (a,):
        started = asyncio.Event()
        cancelled = asyncio.Event()

        async def slow(lease: Lease) -> dict[str, Any]:
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.set()
                raise
            return {}

        task = asyncio.create_task(a.run("blob-w", slow, timeout_s=10))
        await asyncio.wait_for(started.wait(), 5)
        # another node holds the key now, as after an expiry this leader did not notice
        intruder = Lease(key="blob-w", token=10**18, lease_id="other", holder="node-9", ttl_s=5)
        await _redis(a).set(RegionKeys("eu-1").lease("blob-w"), intruder.value, px=5000)
        with pytest.raises(LeaseLost):
            await asyncio.wait_for(task, 2)  # noticed at the next renewal, a third of the TTL
        assert cancelled.is_set()
        assert await a.result("blob-w") is None  # it published nothing
        current = await a.current("blob-w")
        assert current is not None
        assert current.holder == "node-9"


async def test_a_leader_cancelled_lets_a_waiter_lead_at_once(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 2, lease_ttl_s=30) as (a, b):
        started = asyncio.Event()

        async def forever(lease: Lease) -> dict[str, Any]:
            started.set()
            await asyncio.sleep(3600)
            return {}

        task = asyncio.create_task(a.run("blob-v", forever, timeout_s=10))
        await asyncio.wait_for(started.wait(), 5)
        waiting = asyncio.create_task(b.wait("blob-v", timeout_s=10))
        await asyncio.sleep(0.05)
        task.cancel()  # the node stops
        with pytest.raises(asyncio.CancelledError):
            await task
        start = time.monotonic()
        assert await asyncio.wait_for(waiting, 5) is None  # released: no outcome, lead yourself
        assert time.monotonic() - start < 1  # not the 30 s TTL
        assert await b.current("blob-v") is None


async def test_waiting_is_bounded(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 2) as (a, b):
        assert await a.acquire("blob-u", ttl_s=30) is not None  # a leader that never ends
        with pytest.raises(FlightTimeout) as timed_out:
            await b.wait("blob-u", timeout_s=0.3)
        assert timed_out.value.code == "flight_timeout"
        assert timed_out.value.http_status == 503
        assert "Retry-After" in error_headers(timed_out.value)

        async def never(lease: Lease) -> dict[str, Any]:
            raise AssertionError("a waiter must not do the work")

        start = time.monotonic()
        with pytest.raises(FlightTimeout):
            await b.run("blob-u", never, timeout_s=0.3)
        assert time.monotonic() - start < 2


async def test_tokens_keep_growing_across_an_empty_restart(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 1) as (a,):
        before = await a.acquire("k1", ttl_s=5)
        assert before is not None
        await anyio.to_thread.run_sync(redis_server.restart)  # the counter is gone with the rest
        after = await a.acquire("k1", ttl_s=5)
        assert after is not None
        assert after.token > before.token


async def test_a_redis_that_is_down_is_region_unavailable(redis_server: RedisServer) -> None:
    async with nodes(redis_server, 1) as (a,):
        await anyio.to_thread.run_sync(redis_server.stop)
        with pytest.raises(RegionUnavailable) as down:
            await a.acquire("k", ttl_s=5)
        assert down.value.code == "region_unreachable"
        assert down.value.http_status == 503
        assert error_headers(down.value)["Retry-After"] == "1"


def _redis(flight: RegionFlight) -> Redis:
    return flight._redis


async def test_a_redis_error_answer_is_a_region_error_not_an_outage(
    redis_server: RedisServer,
) -> None:
    async with nodes(redis_server, 1) as (a,):
        await _redis(a).set(RegionKeys("eu-1").fence, "not a number")  # INCR will refuse it
        with pytest.raises(RegionError) as refused:
            await a.acquire("k", ttl_s=5)
        assert not isinstance(refused.value, RegionUnavailable)
        assert refused.value.code == "region_error"
        assert "taking a region lease" in refused.value.message


async def test_a_leader_cut_off_from_redis_stops_before_its_lease_can_expire(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Its renewals hang (Redis unreachable from this node only): it must stop its work while
    # its lease still stands in Redis, before another node can take the key and pull too.
    async with nodes(redis_server, 1, lease_ttl_s=3.0) as (a,):
        started = asyncio.Event()
        left_when_stopped: list[int] = []
        lease_key = RegionKeys("eu-1").lease("blob-cut")
        observer = open_redis(redis_server.url, timeout_s=2.0)

        async def hang(lease: Lease) -> None:
            await asyncio.sleep(3600)

        async def slow(lease: Lease) -> dict[str, Any]:
            monkeypatch.setattr(a, "renew", hang)
            started.set()
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                left_when_stopped.append(int(await observer.pttl(lease_key)))
                raise
            return {}

        try:
            task = asyncio.create_task(a.run("blob-cut", slow, timeout_s=30))
            await asyncio.wait_for(started.wait(), 5)
            with pytest.raises(LeaseLost):
                await asyncio.wait_for(task, 10)
        finally:
            await observer.aclose()
        assert left_when_stopped, "the work was never stopped"
        assert left_when_stopped[0] > 0, "it stopped only after its lease had expired"
