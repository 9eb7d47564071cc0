"""The exact size of a pipeline's shard sets before its weights move: headers read ahead.

The registration reserved an estimate for the shard sets of a model whose files are still to
fetch (see ``cache_node.shard_space``), so that a 507 costs the origin nothing. The warm job
then, before the first weight byte, reads each model's ``config.json`` and the safetensors
headers (the 8-byte length, then the header: ranged reads of a few KiB per file) and trues the
reservation up to the exact size: what the estimate over-held goes back at once, and what it
under-held is reserved now (or the job fails with ``insufficient_storage`` before any weight
byte). Files already on the node are read locally.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from typing import Any

from cache_node.errors import OriginError
from cache_node.origins.base import Origin, OriginFile
from cache_node.registry import FileEntry, PipelineRecord
from cache_node.shard_space import Held, held_blob, shard_set_bytes
from cache_node.store import BlobStore
from loader.safetensors_format import SafetensorsHeader, parse_header, read_header

#: A config larger than this is not read ahead (the estimate stands until the files are here).
MAX_CONFIG_BYTES = 1 << 20
#: The same for one safetensors header (the format allows 100 MB; real ones are KiB to MiB).
MAX_HEADER_BYTES = 16 << 20


class ReadAheadSkipped(Exception):
    """The inputs could not be read ahead; the message says why (the estimate stands)."""


async def exact_shard_bytes_ahead(
    store: BlobStore,
    record: PipelineRecord,
    origins: Sequence[Origin],
    held: Held,
    tp_sizes: Sequence[int],
) -> int:
    """The exact bytes of the shard sets of ``tp_sizes``; ReadAheadSkipped (or OriginError)
    when an input cannot be read."""
    models = []
    for model, origin in zip(record.models, origins, strict=True):
        files = {f.path: f for f in model.files}
        config: Mapping[str, Any] = {}
        if "config.json" in files:
            raw = await _read(store, origin, model.name, files["config.json"], held,
                              MAX_CONFIG_BYTES)
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = {}  # as model_config: a config that does not parse means full mode
            config = parsed if isinstance(parsed, dict) else {}
        headers: dict[str, SafetensorsHeader] = {}
        for path, file in files.items():
            if path.endswith(".safetensors"):
                headers[path] = await _header(store, origin, model.name, file, held)
        models.append((config, headers))
    return sum(shard_set_bytes(models, tp_size) for tp_size in tp_sizes)


async def _read(
    store: BlobStore, origin: Origin, model: str, file: FileEntry, held: Held, limit: int
) -> bytes:
    blob = held_blob(store, model, file, held)
    if blob is not None:
        return store.blob_path(blob).read_bytes()
    if file.size > limit:
        raise ReadAheadSkipped(f"{file.path} is {file.size} bytes, more than read ahead")
    return await _span(origin, file.origin_file(), 0, file.size)


async def _header(
    store: BlobStore, origin: Origin, model: str, file: FileEntry, held: Held
) -> SafetensorsHeader:
    blob = held_blob(store, model, file, held)
    if blob is not None:
        return read_header(store.blob_path(blob))
    origin_file = file.origin_file()
    prefix = await _span(origin, origin_file, 0, min(8, file.size))
    if len(prefix) < 8:
        raise ReadAheadSkipped(f"{file.path} is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or 8 + length > file.size:
        raise ReadAheadSkipped(f"{file.path} declares a {length}-byte header")
    body = await _span(origin, origin_file, 8, 8 + length)
    return parse_header(prefix + body, file_size=file.size)


async def _span(origin: Origin, file: OriginFile, start: int, end: int) -> bytes:
    data = bytearray()
    async for piece in origin.read_range(file, start + len(data), end):
        data += piece
    if len(data) != end - start:
        raise OriginError(
            f"origin sent {len(data)} of the {end - start} header bytes of {file.path}",
            retryable=True,
        )
    return bytes(data)
