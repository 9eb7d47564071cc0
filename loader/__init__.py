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
from loader.stream import (  # no torch: eager, and ``loader.stream`` is the function
    StreamReport,
    stream,
)

# What streams into tensors needs torch, which takes seconds to import: a cache node and its
# data-plane workers use this package's byte helpers (digests, reads, headers) and must not pay
# for it. Those names are imported on first use (PEP 562).
if TYPE_CHECKING:  # what the names below are, for the type checker
    from loader.loading import load, load_all_ranks
    from loader.report import LoadReport, LoadResult, MultiLoadResult
    from loader.sinks import CpuSink, CudaSink, RingSink
    from loader.sources import HttpRangeSource, LocalFileSource, RoutingSource

_LAZY = {
    "load": "loader.loading",
    "load_all_ranks": "loader.loading",
    "LoadReport": "loader.report",
    "LoadResult": "loader.report",
    "MultiLoadResult": "loader.report",
    "CpuSink": "loader.sinks",
    "CudaSink": "loader.sinks",
    "RingSink": "loader.sinks",
    "HttpRangeSource": "loader.sources",
    "LocalFileSource": "loader.sources",
    "RoutingSource": "loader.sources",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'loader' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
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
