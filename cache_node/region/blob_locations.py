"""Which node of the region holds which blob: where a node fills from before the origin.

Two Redis sets per fact, written together: ``blob:<sha256>`` (the nodes holding the blob: what
a filling node asks) and ``held:<node_id>`` (the blobs of one node: what is dropped when it dies,
without a scan of every blob). ``holders`` lists the nodes that have a ``held:`` set, so that
the dead ones can be found.

A node adds a blob once it is committed on its disk and removes it when it is evicted or
quarantined; after Redis comes back (perhaps empty) it publishes again the exact set it holds
(:meth:`BlobLocations.publish_all`). A holder is a hint, never a proof: the bytes a peer sends
are verified against the digest like any origin's (I1, I2).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from redis.asyncio import Redis

from cache_node.region.connection import redis_errors, texts
from cache_node.region.keys import RegionKeys, check_blob, check_node_id
from cache_node.region.placement import rank

__all__ = ["BlobLocations"]

# KEYS: the node's membership record, its held set, the holders index. ARGV: node id, the blob
# key prefix. Refused (-1) while the node's record exists, atomically with its heartbeat: a node
# that came back must not lose what it just published. The blob keys are built here from the
# prefix (not passed as KEYS) because they are only known once the held set is read; they share
# the region's hash tag, so this stays legal on a cluster. One pass over the node's set, which
# blocks Redis for about a millisecond per ten thousand blobs.
_DROP_NODE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return -1 end
local blobs = redis.call('SMEMBERS', KEYS[2])
for _, blob in ipairs(blobs) do
  redis.call('SREM', ARGV[2] .. blob, ARGV[1])
end
redis.call('DEL', KEYS[2])
redis.call('SREM', KEYS[3], ARGV[1])
return #blobs
"""


class BlobLocations:
    """Blob → nodes and node → blobs of one region (see the module docstring)."""

    def __init__(self, redis: Redis, *, region: str) -> None:
        self.keys = RegionKeys(region)
        self._redis = redis
        self._drop_script = redis.register_script(_DROP_NODE)

    async def add(self, node_id: str, blobs: Iterable[str]) -> None:
        """Record that ``node_id`` holds ``blobs`` (committed and verified on its disk)."""
        digests = _digests(blobs)
        if not digests:
            return
        with redis_errors("recording blob locations"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.sadd(self.keys.held(node_id), *digests)
            pipe.sadd(self.keys.holders, check_node_id(node_id))
            for blob in digests:
                pipe.sadd(self.keys.blob(blob), node_id)
            await pipe.execute()

    async def remove(self, node_id: str, blobs: Iterable[str]) -> None:
        """Record that ``node_id`` no longer holds ``blobs`` (evicted, quarantined, deleted)."""
        digests = _digests(blobs)
        if not digests:
            return
        with redis_errors("removing blob locations"):
            pipe = self._redis.pipeline(transaction=True)
            pipe.srem(self.keys.held(node_id), *digests)
            for blob in digests:
                pipe.srem(self.keys.blob(blob), node_id)
            await pipe.execute()

    async def publish_all(self, node_id: str, blobs: Iterable[str]) -> None:
        """Make ``blobs`` exactly what the region believes ``node_id`` holds: what a node does
        when it rejoins (Redis restarted, or it was dropped as dead while cut off)."""
        digests = set(_digests(blobs))
        with redis_errors("reading a node's blob locations"):
            recorded = set(texts(await self._redis.smembers(self.keys.held(node_id))))
        # Two steps, not one transaction: only this node writes its own sets, and each step
        # leaves the region's view correct for what it covers.
        await self.remove(node_id, recorded - digests)
        await self.add(node_id, digests - recorded)

    async def holders(self, blob: str) -> set[str]:
        """The nodes recorded as holding ``blob`` (dead ones until they are dropped)."""
        with redis_errors("reading blob locations"):
            return set(texts(await self._redis.smembers(self.keys.blob(blob))))

    async def held_by(self, node_id: str) -> set[str]:
        """The blobs recorded for ``node_id``."""
        with redis_errors("reading a node's blob locations"):
            return set(texts(await self._redis.smembers(self.keys.held(node_id))))

    async def peers(
        self, blob: str, *, live: Collection[str], exclude: str | None = None
    ) -> list[str]:
        """The live nodes (other than ``exclude``) to fill ``blob`` from, in rendezvous order
        for the blob: every node asks the same peer first, and different blobs spread over
        different peers."""
        holding = await self.holders(blob)
        return [node for node in rank(blob, holding & set(live)) if node != exclude]

    async def drop_node(self, node_id: str) -> int | None:
        """Forget every blob of a dead ``node_id``: the number of blobs dropped, or None when
        the node is live (its membership record exists) and nothing was dropped."""
        with redis_errors("dropping a node's blob locations"):
            dropped = await self._drop_script(
                keys=[self.keys.node(node_id), self.keys.held(node_id), self.keys.holders],
                args=[node_id, self.keys.blob_prefix],
            )
        return None if dropped == -1 else int(dropped)

    async def drop_dead(self) -> dict[str, int]:
        """Drop the blobs of every holder whose membership has expired; what was dropped, by
        node. Any node may run it (it is idempotent, and refused for live nodes)."""
        with redis_errors("listing blob holders"):
            holders = sorted(texts(await self._redis.smembers(self.keys.holders)))
        dropped: dict[str, int] = {}
        for node_id in holders:
            count = await self.drop_node(node_id)
            if count is not None:
                dropped[node_id] = count
        return dropped


def _digests(blobs: Iterable[str]) -> list[str]:
    return sorted({check_blob(blob) for blob in blobs})
