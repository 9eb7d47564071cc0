"""Errors raised by a cache node.

The tree::

    WeightCacheError                     code, http_status, message, details
    ├── InvalidInput(ValueError)         400 invalid_input
    ├── Unauthorized                     401 unauthorized (missing or bad token)
    ├── NotFound(LookupError)            404 not_found (also: another tenant's pipeline or blob)
    ├── Conflict                         409 conflict
    │   └── NotWarm                      409 not_warm
    ├── InsufficientStorage              507 insufficient_storage
    ├── IntegrityError(ValueError)       502 integrity_error (bytes that do not match a digest)
    ├── OriginError                      502 origin_error (the origin failed after the retry budget)
    │   ├── OriginUnauthorized           401/403 (gated or private): code unauthorized
    │   └── OriginNotFound               origin has no such repo, revision or object
    └── Overloaded                       503 overloaded, with Retry-After (retry_after_s)
        ├── NodeBusy                     503 node_busy (every blob stream slot taken)
        └── TooManyRequests              429 a tenant's limit: too_many_streams, too_many_leases

The HTTP mapping lives in exactly one place: ``api.errors.install_error_handlers``.
Foreign errors (botocore, httpx, OSError) are translated at the boundary that meets them.
"""

from __future__ import annotations

from typing import Any


class WeightCacheError(Exception):
    """Base of every error weightcache raises on purpose."""

    code = "internal"
    http_status = 500

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        """The wire form: ``{"code", "message", **details}``."""
        return {"code": self.code, "message": self.message, **self.details}


class InvalidInput(WeightCacheError, ValueError):
    code = "invalid_input"
    http_status = 400


class Unauthorized(WeightCacheError):
    code = "unauthorized"
    http_status = 401


class NotFound(WeightCacheError, LookupError):
    code = "not_found"
    http_status = 404


class Conflict(WeightCacheError):
    code = "conflict"
    http_status = 409


class NotWarm(Conflict):
    code = "not_warm"


class InsufficientStorage(WeightCacheError):
    code = "insufficient_storage"
    http_status = 507


class IntegrityError(WeightCacheError, ValueError):
    code = "integrity_error"
    http_status = 502


class OriginError(WeightCacheError):
    """The origin failed; ``retryable`` says whether another attempt may succeed."""

    code = "origin_error"
    http_status = 502

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        retryable: bool = True,
        retry_after: float | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message, origin_status=status, **details)
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after


class OriginUnauthorized(OriginError):
    code = "unauthorized"

    def __init__(self, message: str, *, status: int | None = None, **details: Any) -> None:
        super().__init__(message, status=status, retryable=False, **details)


class OriginNotFound(OriginError):
    code = "origin_not_found"

    def __init__(self, message: str, *, status: int | None = None, **details: Any) -> None:
        super().__init__(message, status=status, retryable=False, **details)


class Overloaded(WeightCacheError):
    """A limit of the node was reached (503); ``retry_after_s`` becomes ``Retry-After``."""

    code = "overloaded"
    http_status = 503

    def __init__(self, message: str, *, retry_after_s: float, **details: Any) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **details)
        self.retry_after_s = retry_after_s


class NodeBusy(Overloaded):
    """Every blob stream slot of the node is taken (503)."""

    code = "node_busy"


class TooManyRequests(Overloaded):
    """A tenant's own limit was reached (429)."""

    code = "too_many_requests"
    http_status = 429


class TooManyStreams(TooManyRequests):
    code = "too_many_streams"


class TooManyLeases(TooManyRequests):
    code = "too_many_leases"
