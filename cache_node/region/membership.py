"""Which nodes are in the region now: heartbeats into Redis, expiry by Redis TTL.

Each node writes its :class:`NodeRecord` under ``node:<node_id>`` with a TTL (``ttl_s``) every
``interval_s`` and adds its id to the ``nodes`` set. A node that stops beating drops out when
its record expires: Redis's own clock decides, so the nodes' clocks never have to agree.
:func:`live_nodes` reads the records and prunes the ids whose record is gone.

Losing Redis is not fatal to a node: it keeps serving what it holds. :class:`Membership`
remembers since when Redis has been unreachable (:attr:`Membership.unreachable_since`) and
offers a readiness check with reason code ``region_unreachable`` for ``/readyz``. Whenever
Redis may have forgotten this node (the first registration, Redis back after an outage, or the
record found missing, as after a restart with an empty Redis) the ``on_rejoin`` hook runs, so
the node can publish again what it holds; it runs again on later beats until it succeeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from cache_node.events import emit
from cache_node.region.connection import redis_errors, texts
from cache_node.region.errors import RegionError
from cache_node.region.keys import RegionKeys, check_node_id

__all__ = [
    "REGION_UNREACHABLE",
    "Membership",
    "NodeRecord",
    "NodeReport",
    "NodeState",
    "RejoinReason",
    "live_nodes",
]

#: The ``/readyz`` reason code of a node that cannot reach its region's Redis.
REGION_UNREACHABLE = "region_unreachable"

NodeState = Literal["ready", "degraded", "draining"]
#: Why the rejoin hook runs: first registration of this process, Redis reachable again after
#: an outage, or this node's record missing although it was written (Redis lost its data).
RejoinReason = Literal["registered", "redis_returned", "record_lost"]

# Only the record's id is kept in the set; its SREM is conditional on the record still being
# absent, so a node that beat again between the read and the prune is never dropped.
_PRUNE = """
if redis.call('EXISTS', KEYS[2]) == 0 then
  return redis.call('SREM', KEYS[1], ARGV[1])
end
return 0
"""


class NodeRecord(BaseModel):
    """What a node says of itself in the region (the value of its membership key)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    node_id: str
    url: str  # where peers and replicas reach it (its advertised URL)
    data_url: str | None = None  # its data plane (sendfile), when it runs one
    region: str
    capacity: int = Field(ge=0)
    used: int = Field(ge=0)
    free: int = Field(ge=0)
    state: NodeState = "ready"
    last_heartbeat: float  # the node's wall clock when it wrote this (for people; TTL decides)


@dataclass(frozen=True)
class NodeReport:
    """The figures a node reports on each beat."""

    capacity: int
    used: int
    free: int
    state: NodeState = "ready"


async def live_nodes(redis: Redis, keys: RegionKeys) -> list[NodeRecord]:
    """The region's nodes whose records have not expired, by node id.

    Ids whose record expired are removed from the ``nodes`` set on the way (conditionally, see
    ``_PRUNE``); a record that does not parse is skipped, never fatal.
    """
    with redis_errors("listing the region's nodes"):
        ids = sorted(texts(await redis.smembers(keys.nodes)))
        if not ids:
            return []
        values = await redis.mget([keys.node(node_id) for node_id in ids])
        records: list[NodeRecord] = []
        for node_id, raw in zip(ids, values, strict=True):
            if raw is None:
                await redis.register_script(_PRUNE)(
                    keys=[keys.nodes, keys.node(node_id)], args=[node_id]
                )
                continue
            try:
                records.append(NodeRecord.model_validate_json(raw))
            except ValidationError:
                emit("region.bad_record", level=logging.WARNING, node_id=node_id)
        return records


class Membership:
    """This node's place in the region: its heartbeat, and what it knows of Redis's reach.

    ``report`` gives the figures of each beat (it must not block the event loop: a node reads
    its usage in a thread). ``on_rejoin`` publishes what the node holds (see module docstring).
    Use ``async with`` or :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        redis: Redis,
        *,
        region: str,
        node_id: str,
        url: str,
        report: Callable[[], Awaitable[NodeReport]],
        on_rejoin: Callable[[RejoinReason], Awaitable[None]] | None = None,
        ttl_s: float = 15.0,
        interval_s: float = 5.0,
        data_url: str | None = None,
    ) -> None:
        if not 0 < interval_s * 2 <= ttl_s:
            # two beats must fit in a TTL: a single late beat must not make the node vanish
            raise ValueError(f"heartbeat interval {interval_s}s must be at most half the TTL")
        self.keys = RegionKeys(region)
        self.node_id = check_node_id(node_id)
        self.url = url
        self.data_url = data_url
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self._redis = redis
        self._report = report
        self._on_rejoin = on_rejoin
        self._registered = False  # a beat of this process has reached Redis
        self._rejoin_due: RejoinReason | None = None
        self._unreachable_since: float | None = None
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None

    # state for /readyz
    @property
    def unreachable_since(self) -> float | None:
        """Wall-clock time since when Redis has failed every beat; None while it answers."""
        return self._unreachable_since

    @property
    def reachable(self) -> bool:
        return self._unreachable_since is None

    def readiness_check(self) -> dict[str, Any] | None:
        """None while Redis answers, else the ``/readyz`` reason ``region_unreachable``
        (the shape of ``app.state.readiness_checks``)."""
        since = self._unreachable_since
        if since is None:
            return None
        return {
            "code": REGION_UNREACHABLE,
            "message": f"the region's Redis has been unreachable for {time.time() - since:.0f}s "
            f"({self._last_error}); this node serves what it holds and fills from origins",
            "since": since,
        }

    # the beat
    async def heartbeat(self) -> bool:
        """Write this node's record with a fresh TTL; True when Redis took it.

        A failed beat records the outage and returns False; it never raises a Redis error.
        """
        report = await self._report()
        record = NodeRecord(
            node_id=self.node_id,
            url=self.url,
            data_url=self.data_url,
            region=self.keys.region,
            capacity=report.capacity,
            used=report.used,
            free=report.free,
            state=report.state,
            last_heartbeat=time.time(),
        )
        try:
            with redis_errors("heartbeat"):
                pipe = self._redis.pipeline(transaction=True)
                # SET ... GET returns the value it replaced: None tells "Redis forgot us".
                pipe.set(
                    self.keys.node(self.node_id),
                    record.model_dump_json(),
                    px=int(self.ttl_s * 1000),
                    get=True,
                )
                pipe.sadd(self.keys.nodes, self.node_id)
                previous, _ = await pipe.execute()
        except RegionError as exc:
            self._mark_unreachable(exc)
            return False
        self._mark_reachable(previous_missing=previous is None)
        if self._rejoin_due is not None:
            return await self._rejoin(self._rejoin_due)
        return True

    def _mark_unreachable(self, exc: RegionError) -> None:
        self._last_error = exc.message
        if self._unreachable_since is None:
            self._unreachable_since = time.time()
            emit("region.unreachable", level=logging.WARNING, region=self.keys.region,
                 node_id=self.node_id, error=exc.message)

    def _mark_reachable(self, *, previous_missing: bool) -> None:
        reason: RejoinReason | None = None
        if self._unreachable_since is not None:
            emit("region.reachable", region=self.keys.region, node_id=self.node_id,
                 down_s=round(time.time() - self._unreachable_since, 3))
            self._unreachable_since = None
            # Redis may be a new, empty one, or other nodes may have dropped this one as dead
            reason = "redis_returned"
        if not self._registered:
            reason = "registered"
        elif reason is None and previous_missing:
            reason = "record_lost"  # Redis restarted (empty) or flushed between two beats
        self._registered = True
        if reason is not None and self._rejoin_due is None:
            self._rejoin_due = reason

    async def _rejoin(self, reason: RejoinReason) -> bool:
        if self._on_rejoin is not None:
            try:
                await self._on_rejoin(reason)
            except RegionError as exc:
                self._mark_unreachable(exc)
                return False
            except Exception as exc:
                # the hook's own failure: try again on the next beat, never stop beating
                emit("region.rejoin_failed", level=logging.ERROR, region=self.keys.region,
                     node_id=self.node_id, reason=reason, error=repr(exc))
                return True
        emit("region.rejoined", region=self.keys.region, node_id=self.node_id, reason=reason)
        self._rejoin_due = None
        return True

    # reading the region
    async def live_nodes(self) -> list[NodeRecord]:
        """The region's live nodes (this one included while its beats reach Redis)."""
        return await live_nodes(self._redis, self.keys)

    # lifecycle
    async def start(self) -> None:
        """Beat once now (a node is registered before it serves), then every ``interval_s``.
        A Redis that is down at start is an outage like any other, not a failed start."""
        if self._task is not None:
            raise RuntimeError("membership already started")
        await self.heartbeat()
        self._task = asyncio.create_task(self._beat_forever(), name=f"heartbeat {self.node_id}")

    async def stop(self, *, leave: bool = True) -> None:
        """Stop beating; ``leave`` removes the record now (placement moves at once) instead of
        letting it expire. Leaving is best effort: an unreachable Redis lets the TTL do it."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if leave:
            with contextlib.suppress(RegionError), redis_errors("leaving the region"):
                pipe = self._redis.pipeline(transaction=True)
                pipe.delete(self.keys.node(self.node_id))
                pipe.srem(self.keys.nodes, self.node_id)
                await pipe.execute()

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.heartbeat()
            except Exception as exc:  # a bug in report() must not end membership
                emit("region.heartbeat_failed", level=logging.ERROR, region=self.keys.region,
                     node_id=self.node_id, error=repr(exc))

    async def __aenter__(self) -> Membership:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()
