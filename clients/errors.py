"""Errors the SDK raises: one per wire ``code`` family, from ``raise_for_status``.

The tree::

    ApiError                       status, code, message, details
    ├── AuthError                  401
    ├── NotFoundError(LookupError) 404 (also another tenant's pipeline)
    ├── NotWarmError               409 not_warm (``state`` in details)
    ├── ConflictError              409 other
    ├── InsufficientStorageError   507
    └── ServerError                5xx other
"""

from __future__ import annotations

from typing import Any

import httpx


class ApiError(Exception):
    """An error answer from a cache node."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(f"{code}: {message}" if code else message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class AuthError(ApiError):
    pass


class NotFoundError(ApiError, LookupError):
    pass


class NotWarmError(ApiError):
    pass


class ConflictError(ApiError):
    pass


class InsufficientStorageError(ApiError):
    pass


class ServerError(ApiError):
    pass


def raise_for_status(response: httpx.Response) -> None:
    """Turn an error answer into the matching :class:`ApiError` (the client's one mapping)."""
    if response.is_success:
        return
    code, message, details = "", response.reason_phrase, {}
    try:
        body = response.json()
        error = body.get("error", {}) if isinstance(body, dict) else {}
        code = str(error.get("code", ""))
        message = str(error.get("message", message))
        details = {k: v for k, v in error.items() if k not in ("code", "message")}
    except ValueError:
        pass
    status = response.status_code
    cls: type[ApiError]
    if status == 401:
        cls = AuthError
    elif status == 404:
        cls = NotFoundError
    elif status == 409:
        cls = NotWarmError if code == "not_warm" else ConflictError
    elif status == 507:
        cls = InsufficientStorageError
    elif status >= 500:
        cls = ServerError
    else:
        cls = ApiError
    raise cls(status, code, message, details)
