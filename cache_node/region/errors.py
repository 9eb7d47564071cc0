"""Errors of the region's building blocks, under the node's tree (``cache_node.errors``)::

    WeightCacheError
    ├── RegionError                        502 region_error (Redis answered with an error)
    │   └── RegionUnavailable(Overloaded)  503 region_unreachable, Retry-After: Redis cannot be
    │                                          reached, timed out, is loading or read-only
    ├── Conflict
    │   └── LeaseLost                      409 lease_lost: a fencing token that is no longer
    │                                          current (a stale leader), refused at renew/commit
    └── Overloaded
        └── FlightTimeout                  503 flight_timeout, Retry-After: waited longer than
                                               allowed for another node's fill

A node that meets ``RegionError`` keeps serving what it holds (the region is an optimisation of
where bytes come from, never a condition for serving them); ``LeaseLost`` means another node
leads now, so the loser stops and must not publish. Peer requests with a bad region secret are
the node's own ``Unauthorized`` (401), with ``reason`` saying why.
"""

from __future__ import annotations

from typing import Any

from cache_node.errors import Conflict, Overloaded, WeightCacheError

__all__ = ["FlightTimeout", "LeaseLost", "RegionError", "RegionUnavailable"]


class RegionError(WeightCacheError):
    """Redis failed a region operation (its message names which)."""

    code = "region_error"
    http_status = 502


class RegionUnavailable(RegionError, Overloaded):
    """Redis cannot be reached now; another attempt in ``retry_after_s`` may succeed."""

    code = "region_unreachable"
    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float = 1.0, **details: Any) -> None:
        Overloaded.__init__(self, message, retry_after_s=retry_after_s, **details)


class LeaseLost(Conflict):
    """The lease is no longer this holder's: it expired, or a newer token took it."""

    code = "lease_lost"


class FlightTimeout(Overloaded):
    """Another node's fill of this key did not finish within the wait allowed."""

    code = "flight_timeout"
