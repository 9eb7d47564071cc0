"""Where each tensor of a load lands in the one flat output allocation, and its torch view.

Tensors are placed so that bytes adjacent in a blob stay adjacent in the output (then adjacent
tensors merge into long reads) and every tensor keeps its alignment in the blob modulo
:data:`ALIGNMENT` (safetensors writers align tensors to their element size, so typed views of
the output need no copy). Tensors of one blob more than :data:`MAX_GAP` apart start a new
region, so a load that needs a few tensors of a large blob does not allocate the whole blob.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from api.schema import ManifestTensor
from loader.errors import LoaderError
from loader.ranges import ByteRange
from loader.safetensors_format import DTYPE_BITS

__all__ = [
    "ALIGNMENT",
    "MAX_GAP",
    "Placement",
    "dtype_code",
    "plan_layout",
    "tensor_view",
    "torch_dtype",
]

ALIGNMENT = 256
MAX_GAP = 1 << 20

# safetensors dtype code -> torch dtype attribute (looked up lazily: older torch lacks some).
_TORCH_NAMES = {
    "BOOL": "bool",
    "U8": "uint8",
    "I8": "int8",
    "I16": "int16",
    "U16": "uint16",
    "F16": "float16",
    "BF16": "bfloat16",
    "I32": "int32",
    "U32": "uint32",
    "F32": "float32",
    "F64": "float64",
    "I64": "int64",
    "U64": "uint64",
    "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E8M0": "float8_e8m0fnu",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
}


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code; LoaderError when torch has none."""
    name = _TORCH_NAMES.get(code)
    dtype = getattr(torch, name, None) if name else None
    if not isinstance(dtype, torch.dtype):
        raise LoaderError(f"dtype {code} has no torch equivalent in torch {torch.__version__}")
    return dtype


def dtype_code(dtype: torch.dtype) -> str:
    """The safetensors dtype code of a torch dtype; LoaderError when safetensors has none."""
    for code, name in _TORCH_NAMES.items():
        if getattr(torch, name, None) == dtype:
            return code
    raise LoaderError(f"torch dtype {dtype} has no safetensors dtype code")


@dataclass(frozen=True, slots=True)
class Placement:
    """A tensor's place in the output: ``length`` bytes at ``dest``, viewed as dtype/shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    dest: int
    length: int


def _check(tensor: ManifestTensor) -> None:
    bits = DTYPE_BITS.get(tensor.dtype)
    if bits is None or any(dim < 0 for dim in tensor.shape):
        raise LoaderError(f"manifest tensor {tensor.name!r}: bad dtype or shape")
    numel = 1
    for dim in tensor.shape:
        numel *= dim
    if numel * bits != tensor.length * 8 or tensor.offset < 0:
        raise LoaderError(
            f"manifest tensor {tensor.name!r}: {tensor.length} bytes at {tensor.offset} do not "
            f"hold shape {tensor.shape} of {tensor.dtype}"
        )


def plan_layout(
    tensors: Sequence[ManifestTensor], *, keys: Sequence[str]
) -> tuple[list[Placement], list[ByteRange], int]:
    """Place ``tensors`` (named ``keys``) in one output; returns placements, ranges, total size."""
    if len(keys) != len(tensors):
        raise ValueError("one key per tensor")
    by_blob: dict[str, list[int]] = defaultdict(list)
    for index, tensor in enumerate(tensors):
        _check(tensor)
        by_blob[tensor.blob].append(index)
    placements: dict[int, Placement] = {}
    ranges: list[ByteRange] = []
    cursor = 0
    for blob in sorted(by_blob):
        order = sorted(by_blob[blob], key=lambda i: (tensors[i].offset, tensors[i].length))
        region_origin = -1  # the blob offset that maps to ``region_base``
        region_base = region_end = 0
        for index in order:
            tensor = tensors[index]
            if region_origin < 0 or tensor.offset - region_end > MAX_GAP:
                region_origin = tensor.offset - tensor.offset % ALIGNMENT
                region_base = -(-cursor // ALIGNMENT) * ALIGNMENT
                region_end = tensor.offset
            dest = region_base + tensor.offset - region_origin
            region_end = max(region_end, tensor.offset + tensor.length)
            cursor = max(cursor, region_base + region_end - region_origin)
            placements[index] = Placement(
                key=keys[index],
                dtype=tensor.dtype,
                shape=tuple(tensor.shape),
                dest=dest,
                length=tensor.length,
            )
            ranges.append(ByteRange(blob, tensor.offset, tensor.length, dest))
    return [placements[i] for i in range(len(tensors))], ranges, cursor


def tensor_view(output: torch.Tensor, placement: Placement) -> torch.Tensor:
    """The tensor at ``placement`` in ``output``: a view, or a copy when misaligned in the blob."""
    raw = output[placement.dest : placement.dest + placement.length]
    dtype = torch_dtype(placement.dtype)
    itemsize = torch.empty((), dtype=dtype).element_size()
    if placement.dest % itemsize:
        # Only a hand-written file puts a tensor off its element alignment; copy it aligned.
        raw = raw.clone()
    return raw.view(dtype).view(placement.shape)
