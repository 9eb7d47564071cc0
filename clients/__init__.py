"""The replica and operator side: the SDK and the ``weightcache`` CLI."""

from clients.client import AsyncClient, Client
from clients.errors import (
    ApiError,
    AuthError,
    ClientError,
    ConflictError,
    ForbiddenError,
    InsufficientStorageError,
    NotFoundError,
    NotWarmError,
    RateLimitedError,
    ServerError,
    UnreachableError,
    UsageError,
    WarmFailed,
    raise_for_status,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthError",
    "Client",
    "ClientError",
    "ConflictError",
    "ForbiddenError",
    "InsufficientStorageError",
    "NotFoundError",
    "NotWarmError",
    "RateLimitedError",
    "ServerError",
    "UnreachableError",
    "UsageError",
    "WarmFailed",
    "raise_for_status",
]
