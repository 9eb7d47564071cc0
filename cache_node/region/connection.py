"""The node's Redis client for its region, and the one place Redis errors are translated.

Timeouts are short and retries few on purpose: a region call that cannot reach Redis must fail
within about a second, so that a heartbeat notices an outage quickly and a fill goes on without
the region instead of hanging (the node keeps serving what it holds).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import redis.exceptions
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from cache_node.events import redact
from cache_node.region.errors import RegionError, RegionUnavailable

__all__ = ["open_redis", "redis_errors", "texts"]

# Errors that say "not now" rather than "wrong": the server is away, slow, still loading its
# snapshot after a restart (BusyLoadingError is a ConnectionError), or a read-only replica.
_UNAVAILABLE = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    redis.exceptions.ReadOnlyError,
    OSError,
)


def open_redis(url: str, *, timeout_s: float = 2.0) -> Redis:
    """A client for the region's Redis at ``url`` (``redis://`` or ``rediss://``).

    One retry on a fresh connection: after Redis restarts, every pooled connection is dead and
    the first command on each fails once; the retry on a new connection is what heals it.
    """
    return Redis.from_url(
        url,
        decode_responses=True,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.05), retries=1),
        health_check_interval=30,
    )


@contextmanager
def redis_errors(what: str) -> Iterator[None]:
    """Translate the Redis client's errors raised inside into :mod:`cache_node.region.errors`."""
    try:
        yield
    except _UNAVAILABLE as exc:
        raise RegionUnavailable(
            f"{what}: the region's Redis is unreachable ({redact(str(exc)) or type(exc).__name__})",
            operation=what,
        ) from exc
    except redis.exceptions.RedisError as exc:
        raise RegionError(f"{what}: Redis answered {redact(str(exc))}", operation=what) from exc


def texts(values: Iterable[bytes | str]) -> list[str]:
    """Replies as ``str``: what a client of :func:`open_redis` (``decode_responses``) returns,
    decoded here too for a client someone opened without it."""
    return [v.decode() if isinstance(v, bytes) else v for v in values]
