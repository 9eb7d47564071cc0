"""A region of cache nodes on one Redis: the building blocks a node is wired to.

- :mod:`~cache_node.region.membership`: heartbeats with TTL expiry, the live nodes, the
  "Redis unreachable since" state for ``/readyz``, and re-registration when Redis returns.
- :mod:`~cache_node.region.placement`: a blob's owner nodes by rendezvous hashing.
- :mod:`~cache_node.region.flight`: region-wide single flight, a lease with a fencing token.
- :mod:`~cache_node.region.blob_locations`: which node holds which blob (peers to fill from).
- :mod:`~cache_node.region.peer_auth`: peers authenticate with the region secret, not as a
  tenant.
- :mod:`~cache_node.region.keys`: the Redis key layout, :mod:`~cache_node.region.connection`:
  the client and the translation of its errors, :mod:`~cache_node.region.errors`: the errors.

Everything above is asyncio (``redis.asyncio``) and talks to Redis only: no disk, no HTTP.
What wires them into a node is apart (imported by the node only when it has ``--redis``, so
not re-exported here):

- :mod:`~cache_node.region.catalogue`: the region's catalogue of registered pipelines.
- :mod:`~cache_node.region.fills`: a fill from peers before the origin, one origin pull per
  region (HTTP to peers, through the node's transfer).
- :mod:`~cache_node.region.node_region`: a node's part in its region (membership, blob
  locations, catalogue reconciliation, fills, manifest holders, ``GET /v1/region``).
"""

from __future__ import annotations

from cache_node.region.blob_locations import BlobLocations
from cache_node.region.connection import open_redis, redis_errors
from cache_node.region.errors import FlightTimeout, LeaseLost, RegionError, RegionUnavailable
from cache_node.region.flight import FlightResult, Lease, RegionFlight, Work
from cache_node.region.keys import RegionKeys, check_blob, check_node_id
from cache_node.region.membership import (
    REGION_UNREACHABLE,
    Membership,
    NodeRecord,
    NodeReport,
    NodeState,
    RejoinReason,
    live_nodes,
)
from cache_node.region.peer_auth import (
    MIN_SECRET_LENGTH,
    PEER_SCHEME,
    Peer,
    RegionSecret,
    is_peer_authorization,
)
from cache_node.region.placement import DEFAULT_REPLICAS, owners, rank, score

__all__ = [
    "DEFAULT_REPLICAS",
    "MIN_SECRET_LENGTH",
    "PEER_SCHEME",
    "REGION_UNREACHABLE",
    "BlobLocations",
    "FlightResult",
    "FlightTimeout",
    "Lease",
    "LeaseLost",
    "Membership",
    "NodeRecord",
    "NodeReport",
    "NodeState",
    "Peer",
    "RegionError",
    "RegionFlight",
    "RegionKeys",
    "RegionSecret",
    "RegionUnavailable",
    "RejoinReason",
    "Work",
    "check_blob",
    "check_node_id",
    "is_peer_authorization",
    "live_nodes",
    "open_redis",
    "owners",
    "rank",
    "redis_errors",
    "score",
]
