"""Errors of the client side (SDK, CLI and loader): one tree, one mapping from a node's answer.

The tree::

    ClientError                          base of every error the client side raises on purpose
    ├── UsageError(ValueError)           a bad argument: a device, a size, a missing command
    ├── UnreachableError(ConnectionError) the node did not answer at all
    ├── ApiError                         the node answered with an error: status, code, message
    │   ├── AuthError                    401
    │   ├── ForbiddenError               403 (e.g. a source outside the tenant's allowance)
    │   ├── NotFoundError(LookupError)   404 (also another tenant's pipeline)
    │   ├── NotWarmError                 409 not_warm (``state``)
    │   ├── ConflictError                409 other
    │   ├── RateLimitedError             429 (``retry_after``)
    │   ├── InsufficientStorageError     507
    │   ├── ServerError                  5xx other
    │   └── WarmFailed                   a pipeline waited on ended ``failed`` (its error's code)
    └── loader.errors.LoaderError        bytes that could not be read, parsed or verified

:func:`raise_for_status` is the one place a node's answer becomes an error, for the SDK, the
CLI and the loader alike. Each class carries the exit code the CLI ends with (``exit_code``):
:data:`EXIT_FAILURE` for failures, :data:`EXIT_USAGE` for usage errors, :data:`EXIT_REFUSED`
when the node refused the request.
"""

from __future__ import annotations

from typing import Any, ClassVar

import httpx

#: Something failed: a warm, a load, a byte that did not verify, a node that did not answer.
EXIT_FAILURE = 1
#: The command line was wrong (argparse uses 2 as well).
EXIT_USAGE = 2
#: The node refused the request: not authorised, not found, not warm, conflict, no room.
EXIT_REFUSED = 3
#: Interrupted by the user (128 + SIGINT).
EXIT_INTERRUPTED = 130


class ClientError(Exception):
    """Base of every error the client side raises on purpose."""

    exit_code: ClassVar[int] = EXIT_FAILURE

    @property
    def code(self) -> str:
        """A short machine-readable name of what went wrong."""
        return "error"


class UsageError(ClientError, ValueError):
    """A bad argument, caught before anything was asked of the node."""

    exit_code = EXIT_USAGE

    @property
    def code(self) -> str:
        return "usage"


class UnreachableError(ClientError, ConnectionError):
    """The node did not answer: refused, reset, timed out, or a name that does not resolve."""

    @property
    def code(self) -> str:
        return "unreachable"


class ApiError(ClientError):
    """An error answer from a cache node."""

    exit_code = EXIT_REFUSED

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self._code = code
        self.message = message
        self.details = details

    @property
    def code(self) -> str:
        return self._code or f"http_{self.status}"


class AuthError(ApiError):
    """401: no token, or one the node does not know."""


class ForbiddenError(ApiError):
    """403: the caller may not do this (a source outside its tenant's allowance)."""


class NotFoundError(ApiError, LookupError):
    """404: no such pipeline, lease or blob for this tenant."""


class NotWarmError(ApiError):
    """409 ``not_warm``: nothing to stream yet; ``state`` says where the pipeline is, and
    ``reason`` the code of its failure when it failed (``invalid_checkpoint``, ...)."""

    @property
    def state(self) -> str | None:
        state = self.details.get("state")
        return str(state) if state is not None else None

    @property
    def reason(self) -> str | None:
        reason = self.details.get("reason")
        return str(reason) if reason else None

    @property
    def code(self) -> str:
        return self.reason or super().code


class ConflictError(ApiError):
    """409: the request conflicts with the pipeline's state (e.g. evicting a leased one)."""


class RateLimitedError(ApiError):
    """429: too many streams or leases; ``retry_after`` seconds, when the node said."""

    @property
    def retry_after(self) -> float | None:
        value = self.details.get("retry_after")
        return float(value) if isinstance(value, int | float) else None


class InsufficientStorageError(ApiError):
    """507: the node cannot make room, even after eviction."""


class ServerError(ApiError):
    """5xx: the node failed; the request may be retried."""

    exit_code = EXIT_FAILURE


class WarmFailed(ApiError):
    """A pipeline that was waited on ended ``failed``: a failure, not a refusal."""

    exit_code = EXIT_FAILURE


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthError,
    403: ForbiddenError,
    404: NotFoundError,
    409: ConflictError,
    429: RateLimitedError,
    507: InsufficientStorageError,
}


def raise_for_status(response: httpx.Response, *, context: str | None = None) -> None:
    """Turn an error answer into the matching :class:`ApiError`; ``context`` prefixes it."""
    if response.is_success:
        return
    code, message, details = "", response.reason_phrase, {}
    try:
        body = response.json()
        error = body.get("error", {}) if isinstance(body, dict) else {}
        code = str(error.get("code", ""))
        message = str(error.get("message", message))
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
    except (ValueError, httpx.ResponseNotRead):
        pass
    status = response.status_code
    if status == 429 and "retry_after" not in details:
        retry_after = response.headers.get("Retry-After", "")
        if retry_after.isascii() and retry_after.isdigit():
            details["retry_after"] = int(retry_after)
    cls = _BY_STATUS.get(status)
    if status == 409 and code == "not_warm":
        cls = NotWarmError
    if cls is None:
        cls = ServerError if status >= 500 else ApiError
    if context:
        message = f"{context}: {message}"
    raise cls(status, code, message, details)
