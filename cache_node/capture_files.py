"""What an uploaded engine shard set holds: its stage and its tensor table, read from its
safetensors header, or InvalidCapture."""

from __future__ import annotations

import json
from pathlib import Path

from api.schema import (
    CAPTURE_BUFFERS_METADATA,
    CAPTURE_STAGE_METADATA,
    CaptureStage,
    CaptureTensor,
)
from cache_node.errors import InvalidCapture
from loader.errors import HeaderError
from loader.safetensors_format import read_header

__all__ = ["MAX_CAPTURE_HEADER_BYTES", "weights_contents"]

#: The largest safetensors header a weights capture may have (about 100,000 tensors): its
#: tensor table is kept in the pipeline's record, read on every status.
MAX_CAPTURE_HEADER_BYTES = 16 << 20


def weights_contents(path: Path) -> tuple[CaptureStage, list[CaptureTensor]]:
    """The stage and tensors of an uploaded engine shard set; InvalidCapture when it is not
    a well-formed safetensors file that says its stage."""
    try:
        with open(path, "rb") as file:
            length = int.from_bytes(file.read(8), "little")
        if length > MAX_CAPTURE_HEADER_BYTES:  # its tensors are kept in the pipeline's record
            raise InvalidCapture(f"the capture's header is {length} bytes, over the "
                                 f"{MAX_CAPTURE_HEADER_BYTES}-byte limit")
        header = read_header(path)
    except (HeaderError, OSError) as exc:
        raise InvalidCapture(f"the capture is not a well-formed safetensors file: {exc}") from None
    stage: CaptureStage
    match (header.metadata or {}).get(CAPTURE_STAGE_METADATA):
        case "processed":
            stage = "processed"
        case "loaded":
            stage = "loaded"
        case _:
            raise InvalidCapture(
                f"the capture's metadata must say {CAPTURE_STAGE_METADATA}: processed or loaded"
            )
    if not header.tensors:
        raise InvalidCapture("the capture holds no tensors")
    try:
        buffers = json.loads((header.metadata or {}).get(CAPTURE_BUFFERS_METADATA, "[]"))
    except ValueError:
        buffers = None
    if not isinstance(buffers, list) or not all(isinstance(b, str) for b in buffers):
        raise InvalidCapture(f"{CAPTURE_BUFFERS_METADATA} must be a JSON list of tensor names")
    tensors = [
        CaptureTensor(
            name=t.name,
            dtype=t.dtype,
            shape=list(t.shape),
            offset=t.absolute_offset(header.data_offset),
            length=t.nbytes,
            buffer=t.name in buffers,
        )
        for t in header.tensors
    ]
    return stage, tensors
