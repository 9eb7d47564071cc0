"""Region-wide single flight: one node does a piece of work, the region waits for its outcome.

Inside a node, ``cache_node.fetch`` already coalesces callers of one transfer. Across the nodes
of a region, a Redis **lease** per key decides which node does it (I4 "per region with peers"):

- :meth:`RegionFlight.acquire` takes the lease if no one holds it, with a **fencing token**:
  an integer from the region's counter (``INCR``), larger for every lease granted.
- The holder **renews** it well within its TTL. A holder that crashes stops renewing, its lease
  expires, and another node takes over: a dead leader never blocks the region for longer
  than one TTL.
- Ending a flight (:meth:`~RegionFlight.commit`, :meth:`~RegionFlight.fail`,
  :meth:`~RegionFlight.release`) is a compare-and-set in one Lua script: it succeeds only while
  the lease in Redis is still exactly this holder's (token and lease id). A stale leader, whose
  lease expired and perhaps went to a newer token, gets :class:`LeaseLost` and publishes
  nothing, so two leaders never both publish. A leader that cannot renew for a whole TTL stops
  its work (:meth:`~RegionFlight.run`): the region may have a new leader by then.
- **Waiters** subscribe to the key's channel and also poll (a lease that expires publishes
  nothing, and a pub/sub connection can drop), with a time limit (:class:`FlightTimeout`).

Outcomes stay readable for a while (``result_ttl_s`` for a success, ``failure_ttl_s`` for a
failure, so that an origin outage is not hammered by every node in turn, I6); after that a
caller finds its answer elsewhere (blob locations) or leads a new flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from cache_node.errors import WeightCacheError
from cache_node.events import emit
from cache_node.region.connection import redis_errors
from cache_node.region.errors import FlightTimeout, LeaseLost, RegionError
from cache_node.region.keys import RegionKeys, check_node_id

__all__ = ["FlightResult", "Lease", "RegionFlight", "Work"]

# KEYS: lease, fence, result. ARGV: lease id, holder, TTL in ms, "1" to answer with a result
# still kept instead of granting a lease.
_CLAIM = """
if ARGV[4] == '1' then
  local kept = redis.call('GET', KEYS[3])
  if kept then return {-1, kept} end
end
local current = redis.call('GET', KEYS[1])
if current then return {0, current} end
if redis.call('EXISTS', KEYS[2]) == 0 then
  -- A Redis that lost the counter (restarted empty) seeds it from its clock in microseconds:
  -- above every token handed out before, unless the region took more than a million leases
  -- a second, so tokens keep growing across restarts.
  local now = redis.call('TIME')
  redis.call('SET', KEYS[2], now[1] .. string.format('%06d', tonumber(now[2])))
end
local token = redis.call('INCR', KEYS[2])
-- %d, not tostring: Lua 5.1 writes a 16-digit number as 1.7e+15
redis.call('SET', KEYS[1], string.format('%d', token) .. ':' .. ARGV[1] .. ':' .. ARGV[2],
           'PX', ARGV[3])
return {token, ''}
"""

# KEYS: lease. ARGV: the lease's value, TTL in ms.
_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

# KEYS: lease, result. ARGV: the lease's value, outcome JSON ('' for none), its TTL in ms
# ('0': publish, do not keep), channel.
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
if ARGV[2] ~= '' and tonumber(ARGV[3]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2], 'PX', ARGV[3])
end
redis.call('PUBLISH', ARGV[4], ARGV[2])
return 1
"""


@dataclass(frozen=True)
class Lease:
    """A held lease: ``token`` is its fencing token (larger is newer, region-wide)."""

    key: str
    token: int
    lease_id: str
    holder: str
    ttl_s: float

    @property
    def value(self) -> str:
        """What Redis holds under the lease key while this lease is current."""
        return f"{self.token}:{self.lease_id}:{self.holder}"

    @classmethod
    def parse(cls, key: str, value: str, *, ttl_s: float) -> Lease:
        token, lease_id, holder = value.split(":", 2)
        return cls(key=key, token=int(token), lease_id=lease_id, holder=holder, ttl_s=ttl_s)


class FlightResult(BaseModel):
    """How a flight ended: ``done`` with the leader's ``detail``, or ``failed`` with the
    error's ``{"code", "message", ...}`` in ``detail``."""

    model_config = ConfigDict(frozen=True)

    key: str
    status: Literal["done", "failed"]
    token: int
    holder: str
    detail: dict[str, Any] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "done"


#: The work of a flight's leader: given its lease, returns the ``detail`` of a ``done`` outcome.
Work = Callable[[Lease], Coroutine[Any, Any, dict[str, Any]]]


class RegionFlight:
    """Single flight across the nodes of one region (see the module docstring)."""

    def __init__(
        self,
        redis: Redis,
        *,
        region: str,
        holder: str,
        lease_ttl_s: float = 30.0,
        result_ttl_s: float = 60.0,
        failure_ttl_s: float = 5.0,
        poll_s: float = 0.5,
    ) -> None:
        self.keys = RegionKeys(region)
        self.holder = check_node_id(holder)
        self.lease_ttl_s = lease_ttl_s
        self.result_ttl_s = result_ttl_s
        self.failure_ttl_s = failure_ttl_s
        self.poll_s = poll_s
        self._redis = redis
        self._claim_script = redis.register_script(_CLAIM)
        self._renew_script = redis.register_script(_RENEW)
        self._finish_script = redis.register_script(_FINISH)

    # the lease
    async def acquire(self, key: str, *, ttl_s: float | None = None) -> Lease | None:
        """The lease of ``key`` with a new fencing token, or None while another holds it."""
        claim = await self._claim(key, ttl_s=ttl_s or self.lease_ttl_s, take_kept=False)
        assert not isinstance(claim, FlightResult)
        return claim

    async def current(self, key: str) -> Lease | None:
        """The lease of ``key`` as Redis holds it now (any holder's), ``ttl_s`` what is left."""
        with redis_errors("reading a region lease"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.get(self.keys.lease(key))
            pipe.pttl(self.keys.lease(key))
            value, pttl = await pipe.execute()
        if value is None:
            return None
        return Lease.parse(key, value, ttl_s=max(0, pttl) / 1000)

    async def check(self, lease: Lease) -> bool:
        """Whether ``lease`` is still the current one (not expired, no newer token)."""
        with redis_errors("checking a region lease"):
            return bool(await self._redis.get(self.keys.lease(lease.key)) == lease.value)

    async def renew(self, lease: Lease) -> None:
        """Extend ``lease`` by its TTL; LeaseLost when it is no longer current."""
        with redis_errors("renewing a region lease"):
            renewed = await self._renew_script(
                keys=[self.keys.lease(lease.key)], args=[lease.value, _ms(lease.ttl_s)]
            )
        if not renewed:
            raise self._lost(lease, "renew")

    async def commit(self, lease: Lease, detail: dict[str, Any]) -> FlightResult:
        """End the flight as done and tell the waiters; LeaseLost (nothing published) when the
        lease is no longer current."""
        result = FlightResult(key=lease.key, status="done", token=lease.token,
                              holder=lease.holder, detail=detail)
        await self._finish(lease, result, keep_s=self.result_ttl_s)
        return result

    async def fail(self, lease: Lease, error: dict[str, Any]) -> FlightResult:
        """End the flight as failed (``error`` is ``{"code", "message", ...}``); kept for
        ``failure_ttl_s`` so the region does not retry at once. LeaseLost as :meth:`commit`."""
        result = FlightResult(key=lease.key, status="failed", token=lease.token,
                              holder=lease.holder, detail=error)
        await self._finish(lease, result, keep_s=self.failure_ttl_s)
        return result

    async def release(self, lease: Lease) -> bool:
        """Give the lease up without an outcome: waiters try to lead at once instead of after
        the TTL. False when it was no longer this holder's (nothing done)."""
        try:
            await self._finish(lease, None, keep_s=0)
        except LeaseLost:
            return False
        return True

    # the outcome
    async def result(self, key: str) -> FlightResult | None:
        """The outcome of ``key``'s last flight while it is kept, else None."""
        with redis_errors("reading a region flight's result"):
            raw = await self._redis.get(self.keys.result(key))
        return None if raw is None else FlightResult.model_validate_json(raw)

    async def wait(self, key: str, *, timeout_s: float) -> FlightResult | None:
        """Wait for the flight of ``key`` to end: its outcome, or None when no lease is held
        (never was, released, or expired: the caller may lead). FlightTimeout after
        ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        with redis_errors("waiting for a region flight"):
            async with self._redis.pubsub() as pubsub:
                await pubsub.subscribe(self.keys.channel(key))
                while True:
                    # Read after subscribing: a flight ending from now on is heard, one that
                    # ended before is read here. One MGET, so no commit falls between the two.
                    kept, held = await self._redis.mget(
                        [self.keys.result(key), self.keys.lease(key)]
                    )
                    if kept is not None:
                        return FlightResult.model_validate_json(kept)
                    if held is None:
                        return None
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        raise FlightTimeout(
                            f"region flight {key!r} did not end within {timeout_s:g}s",
                            retry_after_s=self.poll_s, key=key,
                        )
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=min(self.poll_s, remaining)
                    )
                    if message is not None:
                        data = message["data"]
                        return FlightResult.model_validate_json(data) if data else None

    # all of it
    async def run(self, key: str, work: Work, *, timeout_s: float) -> FlightResult:
        """Lead the flight of ``key`` or wait for its leader, until there is an outcome.

        A kept outcome is returned as it is. As leader: ``work`` runs while the lease is
        renewed; its detail is committed; an error it raises is published as a failure and
        raised here; LeaseLost when the lease was lost on the way (``work`` is cancelled then).
        As waiter: the leader's outcome, or this node leads when the lease ends without one.
        FlightTimeout once ``timeout_s`` has passed without an outcome.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            claim = await self._claim(key, ttl_s=self.lease_ttl_s, take_kept=True)
            if isinstance(claim, FlightResult):
                return claim
            if claim is not None:
                return await self._lead(claim, work)
            outcome = await self.wait(key, timeout_s=max(0.0, deadline - loop.time()))
            if outcome is not None:
                return outcome

    async def _lead(self, lease: Lease, work: Work) -> FlightResult:
        lost = asyncio.Event()
        task = asyncio.create_task(work(lease), name=f"region flight {lease.key}")
        keeper = asyncio.create_task(self._keep(lease, task, lost))
        try:
            try:
                detail = await task
            finally:
                keeper.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await keeper
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if lost.is_set() and current is not None and current.cancelling() == 0:
                raise self._lost(lease, "work") from None
            # This node is stopping: let a waiter lead now rather than after the TTL.
            with contextlib.suppress(RegionError):
                await self.release(lease)
            raise
        except Exception as exc:
            error = exc.to_dict() if isinstance(exc, WeightCacheError) else {
                "code": "internal", "message": f"{type(exc).__name__}: {exc}"}
            with contextlib.suppress(RegionError, LeaseLost):
                await self.fail(lease, error)
            raise
        return await self.commit(lease, detail)

    async def _keep(self, lease: Lease, task: asyncio.Task[Any], lost: asyncio.Event) -> None:
        """Renew ``lease`` every third of its TTL; cancel ``task`` once it is lost, or before
        the lease can have expired in Redis when no renewal got through: a fifth of a TTL
        before, counted from when the last good renewal was *sent* (a renewal that hangs is
        given up at that point too). Another node may lead once it has expired; two leaders
        must not both pull."""
        loop = asyncio.get_running_loop()
        margin = lease.ttl_s / 5
        valid_until = loop.time() + lease.ttl_s - margin  # the claim was sent before this
        while True:
            await asyncio.sleep(max(0.0, min(lease.ttl_s / 3, valid_until - loop.time())))
            sent = loop.time()
            if sent >= valid_until:
                break
            try:
                await asyncio.wait_for(self.renew(lease), timeout=valid_until - sent)
            except LeaseLost:
                break
            except (RegionError, TimeoutError):
                continue  # tried again until valid_until, then the work stops
            valid_until = sent + lease.ttl_s - margin
        lost.set()
        task.cancel()

    # Redis
    async def _claim(
        self, key: str, *, ttl_s: float, take_kept: bool
    ) -> Lease | FlightResult | None:
        lease_id = uuid.uuid4().hex[:16]
        with redis_errors("taking a region lease"):
            token, value = await self._claim_script(
                keys=[self.keys.lease(key), self.keys.fence, self.keys.result(key)],
                args=[lease_id, self.holder, _ms(ttl_s), "1" if take_kept else "0"],
            )
        if token == -1:
            return FlightResult.model_validate_json(value)
        if token == 0:
            return None
        return Lease(key=key, token=int(token), lease_id=lease_id, holder=self.holder,
                     ttl_s=ttl_s)

    async def _finish(self, lease: Lease, result: FlightResult | None, *, keep_s: float) -> None:
        outcome = "" if result is None else result.model_dump_json()
        with redis_errors("ending a region flight"):
            ended = await self._finish_script(
                keys=[self.keys.lease(lease.key), self.keys.result(lease.key)],
                args=[lease.value, outcome, _ms(keep_s), self.keys.channel(lease.key)],
            )
        if not ended:
            raise self._lost(lease, "commit")

    def _lost(self, lease: Lease, stage: str) -> LeaseLost:
        emit("region.lease_lost", level=logging.WARNING, key=lease.key, token=lease.token,
             holder=lease.holder, stage=stage)
        return LeaseLost(
            f"the region lease of {lease.key!r} (token {lease.token}) is no longer this "
            f"node's: it expired or a newer leader holds it ({stage})",
            key=lease.key, token=lease.token, stage=stage,
        )


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000)) if seconds > 0 else 0
