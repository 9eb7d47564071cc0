"""The replica side of weightcache: safetensors parsing, the stream engine, and ``load``.

Imports only torch, numpy, httpx, pydantic, xxhash and the standard library (what a serving image
has), plus ``api.schema`` for the wire models.
"""

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

# A cache node imports ``loader.safetensors_format`` (standard library only) and may run
# without torch; everything that streams into tensors needs it.
try:
    import torch  # noqa: F401
except ImportError:  # pragma: no cover - exercised on torch-less cache nodes
    pass
else:
    from loader.load import load, load_all_ranks
    from loader.report import LoadReport, LoadResult, MultiLoadResult
    from loader.sinks import CpuSink, CudaSink, RingSink
    from loader.sources import HttpRangeSource, LocalFileSource, RoutingSource
    from loader.stream import StreamReport, stream

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
