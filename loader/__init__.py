"""The replica side of weightcache: safetensors parsing, the stream engine, and ``load``.

Imports only torch, numpy, httpx, pydantic, xxhash and the standard library (what a serving image
has), plus ``api.schema`` for the wire models.
"""

import importlib
from typing import TYPE_CHECKING

from loader.errors import (
    HeaderError,
    IntegrityError,
    LoaderError,
    NotWarmError,
    NoWeightsError,
    RangeResponseError,
    ServerError,
    SourceError,
)
from loader.ranges import BlobDigests, ByteRange
from loader.safetensors_format import (
    SafetensorsHeader,
    TensorInfo,
    encode_header,
    parse_header,
    read_header,
)

# What streams into tensors needs torch, which takes seconds to import: a cache node and its
# data-plane workers use this package's byte helpers (digests, reads, headers) and must not pay
# for it. Those names are imported on first use (PEP 562).
if TYPE_CHECKING:  # what the names below are, for the type checker
    from loader.load import load, load_all_ranks
    from loader.report import LoadReport, LoadResult, MultiLoadResult
    from loader.sinks import CpuSink, CudaSink, RingSink
    from loader.sources import HttpRangeSource, LocalFileSource, RoutingSource
    from loader.stream import StreamReport, stream

_LAZY = {
    "load": "loader.load",
    "load_all_ranks": "loader.load",
    "LoadReport": "loader.report",
    "LoadResult": "loader.report",
    "MultiLoadResult": "loader.report",
    "CpuSink": "loader.sinks",
    "CudaSink": "loader.sinks",
    "RingSink": "loader.sinks",
    "HttpRangeSource": "loader.sources",
    "LocalFileSource": "loader.sources",
    "RoutingSource": "loader.sources",
    "StreamReport": "loader.stream",
    "stream": "loader.stream",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    # bound here, so that ``loader.load`` is the function, not the submodule of that name
    # that importing it has just set on this package
    globals()[name] = value
    return value


__all__ = [
    "BlobDigests",
    "ByteRange",
    "CpuSink",
    "CudaSink",
    "HeaderError",
    "HttpRangeSource",
    "IntegrityError",
    "LoadReport",
    "LoadResult",
    "LoaderError",
    "LocalFileSource",
    "MultiLoadResult",
    "NoWeightsError",
    "NotWarmError",
    "RangeResponseError",
    "RingSink",
    "RoutingSource",
    "SafetensorsHeader",
    "ServerError",
    "SourceError",
    "StreamReport",
    "TensorInfo",
    "encode_header",
    "load",
    "load_all_ranks",
    "parse_header",
    "read_header",
    "stream",
]
