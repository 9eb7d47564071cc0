"""The replica and operator side: the SDK and the ``weightcache`` CLI."""

from clients.client import AsyncClient, Client, WarmFailed
from clients.errors import (
    ApiError,
    AuthError,
    ConflictError,
    InsufficientStorageError,
    NotFoundError,
    NotWarmError,
    ServerError,
)

__all__ = [
    "ApiError",
    "AsyncClient",
    "AuthError",
    "Client",
    "ConflictError",
    "InsufficientStorageError",
    "NotFoundError",
    "NotWarmError",
    "ServerError",
    "WarmFailed",
]
