"""Errors raised on the replica side (``loader``).

The tree::

    LoaderError(ClientError)             base of every error the loader raises on purpose
    ├── HeaderError(ValueError)          a malformed or unsupported safetensors header
    ├── NoWeightsError                   the manifest holds no tensors: nothing to load
    ├── SourceError(OSError)             bytes could not be read: a missing blob file, a short
    │   │                                read, or every base URL failed for a range
    │   └── RangeResponseError           a server answered a range request wrongly (status,
    │                                    Content-Range, length)
    ├── IntegrityError(ValueError)       bytes that do not match the manifest's chunk digests
    ├── WeightMismatch(ValueError)       a shard tensor has no home in the engine's model, does
    │                                    not fit it, or a parameter stays empty (``code``)
    └── CaptureMismatch                  an engine shard set does not fit the model (a name,
                                         shape or dtype): nothing was read into it

    LaunchError(clients.errors.UsageError)  ``weightcache launch`` cannot start

A node's error answers (not warm, not found, a server error) are the client side's one tree,
:mod:`clients.errors`; ``NotWarmError`` and ``ServerError`` are re-exported here for the loader's
callers. Foreign errors (``httpx``, ``OSError``) are translated where they are met: the sources
raise ``SourceError`` with the original as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

from clients.errors import ClientError, NotWarmError, ServerError, UsageError

__all__ = [
    "CaptureMismatch",
    "HeaderError",
    "IntegrityError",
    "LaunchError",
    "LoaderError",
    "NoWeightsError",
    "NotWarmError",
    "RangeResponseError",
    "ServerError",
    "SourceError",
    "WeightMismatch",
]


class LoaderError(ClientError):
    """Base of every error the loader raises on purpose."""

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    @property
    def code(self) -> str:
        given = self.details.get("code")
        return str(given) if given else _CODES.get(type(self).__name__, "load_error")


class HeaderError(LoaderError, ValueError):
    """A safetensors header that is malformed, truncated, inconsistent or unsupported."""


class NoWeightsError(LoaderError):
    """The manifest holds no tensors: a load that would deliver nothing is an error."""


class SourceError(LoaderError, OSError):
    """Bytes could not be read from any source (file missing or short, all URLs failed)."""


class RangeResponseError(SourceError):
    """A server answered a range request with the wrong status, Content-Range or length."""


class IntegrityError(LoaderError, ValueError):
    """Received bytes do not match the manifest's per-chunk xxh3-128 digests."""


class WeightMismatch(LoaderError, ValueError):
    """A shard tensor has no home in the model, does not fit it, or a parameter stays empty.

    ``code``: ``no_parameter``, ``shape_mismatch``, ``fused_rows``, ``unfilled``,
    ``not_contiguous``, ``misaligned`` or ``layout``.
    """

    def __init__(self, message: str, *, code: str, **details: Any) -> None:
        super().__init__(f"{message} [{code}]", code=code, **details)


class CaptureMismatch(LoaderError):
    """An engine shard set does not fit the model (a name, shape or dtype): nothing was read
    into it."""


class LaunchError(UsageError):
    """The launch cannot start: no command, or a model name the pipeline does not have."""


_CODES = {
    "HeaderError": "invalid_header",
    "SourceError": "source_error",
    "RangeResponseError": "bad_range_response",
    "IntegrityError": "integrity_error",
    "NoWeightsError": "no_weights",
    "CaptureMismatch": "capture_mismatch",
}
