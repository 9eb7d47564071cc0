"""Errors raised by a cache node.

The tree::

    WeightCacheError                     code, http_status, message, details
    ├── InvalidInput(ValueError)         400 invalid_input
    │   └── LocalSourceNotAllowed        400 invalid_input, reason no_local_root /
    │                                        outside_local_roots / data_dir (file:// sources)
    ├── Unauthorized                     401 unauthorized (missing or bad token)
    ├── SourceNotAllowed                 403 source_not_allowed (outside the tenant's sources)
    ├── NotFound(LookupError)            404 not_found (also: another tenant's pipeline or blob)
    ├── Conflict                         409 conflict
    │   ├── NotWarm                      409 not_warm
    │   └── AmbiguousPipeline            409 ambiguous_pipeline (admin: an id several tenants use)
    ├── InsufficientStorage              507 insufficient_storage
    ├── IntegrityError(ValueError)       502 integrity_error (bytes that do not match a digest)
    └── OriginError                      502 origin_error (the origin failed after the retry budget)
        ├── OriginUnauthorized           401/403 (gated or private): code unauthorized
        └── OriginNotFound               origin has no such repo, revision or object

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


class LocalSourceNotAllowed(InvalidInput):
    """A ``file://`` source this node does not serve from; ``reason`` says which rule.

    The code stays ``invalid_input`` (what clients always got for it); ``reason`` tells apart a
    node without ``--local-root`` from a path outside it.
    """


class Unauthorized(WeightCacheError):
    code = "unauthorized"
    http_status = 401


class SourceNotAllowed(WeightCacheError):
    """A well-formed source this tenant may not use (outside its ``sources``)."""

    code = "source_not_allowed"
    http_status = 403


class NotFound(WeightCacheError, LookupError):
    code = "not_found"
    http_status = 404


class Conflict(WeightCacheError):
    code = "conflict"
    http_status = 409


class NotWarm(Conflict):
    code = "not_warm"


class AmbiguousPipeline(Conflict):
    """Admin named an id that several tenants use; ``tenants`` lists them (add ``?tenant=``)."""

    code = "ambiguous_pipeline"


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
