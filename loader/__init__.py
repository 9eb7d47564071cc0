"""The replica side of weightcache: safetensors parsing, the stream engine, and ``load``.

Imports only torch, numpy, httpx, pydantic, xxhash and the standard library (what a serving image
has), plus ``api.schema`` for the wire models.
"""

from __future__ import annotations

import importlib
from typing import Any

# Exports load lazily: the cache node imports ``loader.safetensors_format`` (standard library
# only) and must not pull in torch through this package's ``__init__``.
_EXPORTS = {
    "HeaderError": "loader.errors",
    "IntegrityError": "loader.errors",
    "LoaderError": "loader.errors",
    "NotWarmError": "loader.errors",
    "RangeResponseError": "loader.errors",
    "ServerError": "loader.errors",
    "SourceError": "loader.errors",
    "LoadReport": "loader.load",
    "LoadResult": "loader.load",
    "MultiLoadResult": "loader.load",
    "load": "loader.load",
    "load_all_ranks": "loader.load",
    "BlobDigests": "loader.ranges",
    "ByteRange": "loader.ranges",
    "SafetensorsHeader": "loader.safetensors_format",
    "TensorInfo": "loader.safetensors_format",
    "encode_header": "loader.safetensors_format",
    "parse_header": "loader.safetensors_format",
    "read_header": "loader.safetensors_format",
    "CpuSink": "loader.sinks",
    "CudaSink": "loader.sinks",
    "RingSink": "loader.sinks",
    "HttpRangeSource": "loader.sources",
    "LocalFileSource": "loader.sources",
    "RoutingSource": "loader.sources",
    "StreamReport": "loader.stream",
    "stream": "loader.stream",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'loader' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
