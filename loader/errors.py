"""Errors raised on the replica side (``loader``).

The tree::

    LoaderError                          base of every error the loader raises on purpose
    ├── HeaderError(ValueError)          a malformed or unsupported safetensors header
    ├── NotWarmError                     the node answered 409 not_warm: nothing to stream yet
    │                                    (``reason``: the failure's code when it failed)
    ├── NoWeightsError                   the manifest holds no tensors: nothing to load
    ├── ServerError                      the node answered an unexpected status (code, status)
    ├── SourceError(OSError)             bytes could not be read: a missing blob file, a short
    │   │                                read, or every base URL failed for a range
    │   └── RangeResponseError           a server answered a range request wrongly (status,
    │                                    Content-Range, length)
    └── IntegrityError(ValueError)       bytes that do not match the manifest's chunk digests

Foreign errors (``httpx``, ``OSError``) are translated where they are met: the sources raise
``SourceError`` with the original as ``__cause__``.
"""

from __future__ import annotations

from typing import Any


class LoaderError(Exception):
    """Base of every error the loader raises on purpose."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class HeaderError(LoaderError, ValueError):
    """A safetensors header that is malformed, truncated, inconsistent or unsupported."""


class NotWarmError(LoaderError):
    """The pipeline is not warm on the node (409 ``not_warm``); ``state`` says where it is, and
    ``reason`` (and ``code``) the code of its failure when it failed (``invalid_checkpoint``)."""

    def __init__(
        self,
        message: str,
        *,
        state: str | None = None,
        reason: str | None = None,
        **details: Any,
    ) -> None:
        super().__init__(message, state=state, reason=reason, **details)
        self.state = state
        self.reason = reason
        self.code = reason or "not_warm"


class NoWeightsError(LoaderError):
    """The manifest holds no tensors: a load that would deliver nothing is an error."""

    code = "no_weights"


class ServerError(LoaderError):
    """The node answered with an unexpected status; ``status`` and ``code`` come from it."""

    def __init__(
        self, message: str, *, status: int, code: str | None = None, **details: Any
    ) -> None:
        super().__init__(message, status=status, code=code, **details)
        self.status = status
        self.code = code


class SourceError(LoaderError, OSError):
    """Bytes could not be read from any source (file missing or short, all URLs failed)."""


class RangeResponseError(SourceError):
    """A server answered a range request with the wrong status, Content-Range or length."""


class IntegrityError(LoaderError, ValueError):
    """Received bytes do not match the manifest's per-chunk xxh3-128 digests."""
