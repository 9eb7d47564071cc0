"""Errors raised by a cache node.

The tree::

    WeightCacheError                     code, http_status, message, details
    ├── InvalidInput(ValueError)         400 invalid_input
    │   ├── LocalSourceNotAllowed        400 invalid_input, reason no_local_root /
    │   │                                    outside_local_roots / data_dir (file:// sources)
    │   ├── ShardingUnsupported          400 unshardable (that TP size is served in full-tensor
    │   │                                    mode instead)
    │   ├── TooLarge                     413 too_large (an upload over its limit)
    │   └── UploadStalled                408 upload_stalled (an upload that stopped sending)
    ├── Unauthorized                     401 unauthorized (missing or bad token)
    ├── SourceNotAllowed                 403 source_not_allowed (outside the tenant's sources)
    ├── NotFound(LookupError)            404 not_found (also: another tenant's pipeline or blob)
    ├── Conflict                         409 conflict
    │   ├── NotWarm                      409 not_warm
    │   ├── AmbiguousPipeline            409 ambiguous_pipeline (admin: an id several tenants use)
    │   └── CaptureKeyMismatch           409 capture_key_mismatch (a capture made for another
    │                                        version of the model, or another id than its key's)
    ├── InsufficientStorage              507 insufficient_storage
    ├── IntegrityError(ValueError)       502 integrity_error (bytes that do not match a digest)
    │   └── UploadIntegrityError         422 integrity_error (uploaded bytes that do not match
    │                                        the size or sha256 their sender declared)
    ├── InvalidCheckpoint(ValueError)    422 invalid_checkpoint (weights no loader can read)
    │   ├── NoWeights                    422 no_weights (a source without loadable weights)
    │   └── InvalidCapture               422 invalid_capture (an engine shard set that is not a
    │                                        well-formed safetensors file of its stage)
    ├── OriginError                      502 origin_error (the origin failed after the retry budget)
    │   ├── OriginUnauthorized           401/403 (gated or private): code unauthorized
    │   └── OriginNotFound               origin has no such repo, revision or object
    └── Overloaded                       503 overloaded, with Retry-After (retry_after_s)
        ├── NodeBusy                     503 node_busy (every blob stream slot taken)
        └── TooManyRequests              429 a tenant's limit: too_many_streams, too_many_leases,
                                             too_many_uploads

The HTTP mapping lives in exactly one place: ``api.errors.install_error_handlers``.
Foreign errors (botocore, httpx, OSError) are translated at the boundary that meets them.

Transient or permanent (:func:`is_transient`): a warm that failed for a transient reason (the
origin answered 5xx or 429, timed out, stalled or could not be reached: an ``OriginError`` with
``retryable`` set, after the fetcher's own retry budget) is tried again on its own later, with
backoff (``cache_node.retry``). Everything else is permanent and waits for a person: a refused or
missing source (``unauthorized``, ``origin_not_found``), bytes that do not match their digest
(``integrity_error``: a wrong declared digest does not heal by asking again), weights no loader
can read (``invalid_checkpoint``, ``no_weights``), no space (``insufficient_storage``: room is
made by a person or by eviction, and an automatic retry could evict others' warm pipelines), and
internal errors.
"""

from __future__ import annotations

import math
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


class ShardingUnsupported(InvalidInput):
    """This model cannot be split for this TP size; serve it in full-tensor mode instead."""

    code = "unshardable"


class TooLarge(InvalidInput):
    """An upload larger than the node takes (``limit`` says how much)."""

    code = "too_large"
    http_status = 413


class UploadStalled(InvalidInput):
    """An upload that sent nothing for too long: dropped, with its reservation."""

    code = "upload_stalled"
    http_status = 408


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


class CaptureKeyMismatch(Conflict):
    """A capture's key does not name the pipeline as it is: a snapshot or ``config.json`` of
    another version of the model (re-registered meanwhile), or an id that is not its key's."""

    code = "capture_key_mismatch"


class InsufficientStorage(WeightCacheError):
    code = "insufficient_storage"
    http_status = 507


class IntegrityError(WeightCacheError, ValueError):
    code = "integrity_error"
    http_status = 502


class UploadIntegrityError(IntegrityError):
    """Uploaded bytes whose size or sha256 (computed by the node) is not what the sender
    declared: nothing was stored. The sender's fault, so a 4xx."""

    http_status = 422


class InvalidCheckpoint(WeightCacheError, ValueError):
    """The fetched files are intact but are not a loadable checkpoint (``path`` says which)."""

    code = "invalid_checkpoint"
    http_status = 422


class NoWeights(InvalidCheckpoint):
    """A source whose files hold no weights weightcache can load (none, or only ``.bin``)."""

    code = "no_weights"


class InvalidCapture(InvalidCheckpoint):
    """An uploaded engine shard set that is not a well-formed safetensors file of its stage."""

    code = "invalid_capture"


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


class TooManyUploads(TooManyRequests):
    code = "too_many_uploads"


def is_transient(error: WeightCacheError) -> bool:
    """Whether another attempt later may succeed on its own (see the module docstring)."""
    return isinstance(error, OriginError) and error.retryable


#: Codes a failed warm may end with that never heal by themselves, and what a person does.
PERMANENT_ACTIONS: dict[str, str] = {
    "unauthorized": "give the node a token or credentials that can read the source, then warm",
    "origin_not_found": "fix the source or revision (register again), then warm",
    "not_found": "fix the source or revision (register again), then warm",
    "integrity_error": "the origin's bytes do not match its digests: fix the source, then warm",
    "invalid_checkpoint": "fix the checkpoint at the source (or register another), then warm",
    "no_weights": "point the model at safetensors weights (register again), then warm",
    "insufficient_storage": "free space or raise --capacity, then warm",
}


def action_for(code: str) -> str:
    """What a person does about a permanent failure with this code."""
    return PERMANENT_ACTIONS.get(code, "waits for a person: fix the cause, then warm")


def error_headers(exc: WeightCacheError) -> dict[str, str]:
    """Headers an error answer carries on either port: the auth challenge, ``Retry-After``."""
    headers = {"WWW-Authenticate": "Bearer"} if exc.http_status == 401 else {}
    if isinstance(exc, Overloaded):
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
    return headers
