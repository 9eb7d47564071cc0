"""A strict safetensors header parser, validator and encoder (standard library only).

A safetensors file is::

    [8 bytes: n, little-endian u64][n bytes: UTF-8 JSON header][data section]

The header maps each tensor name to ``{"dtype", "shape", "data_offsets": [start, end]}``, with
offsets relative to the data section, plus an optional ``"__metadata__"`` object of strings.

The rules follow the reference implementation (the ``safetensors`` package, whose Rust core is
the de-facto specification) so that this parser accepts a header only if the package accepts it:

- ``n`` is at most 100,000,000 and the header fits in the file;
- the header is UTF-8 JSON: an object, no NaN/Infinity, no lone surrogates, no fractional or
  negative numbers where integers are expected, integers fit in a u64;
- sorted by offsets, the tensors pack the data section contiguously from 0: no gaps, no overlap,
  and (when the file size is known) the last byte of data is the last byte of the file;
- each tensor's span equals ``prod(shape) * bits(dtype) / 8``, a whole number of bytes.

It is deliberately stricter than the package in two places, both signs of a file that no
safetensors writer produced: duplicate keys anywhere (the package keeps the last one) and unknown
fields in a tensor entry (the package ignores them).
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loader.errors import HeaderError

__all__ = [
    "DTYPE_BITS",
    "DTYPE_SIZES",
    "MAX_HEADER_SIZE",
    "SafetensorsHeader",
    "TensorInfo",
    "encode_header",
    "parse_header",
    "read_header",
]

#: The reference implementation refuses headers larger than this (a guard against huge allocs).
MAX_HEADER_SIZE = 100_000_000
_LENGTH_PREFIX = 8
_U64_MAX = 2**64 - 1
_METADATA_KEY = "__metadata__"
_TENSOR_FIELDS = frozenset({"dtype", "shape", "data_offsets"})

#: Bits per element of every dtype the ``safetensors`` package knows (0.8: sub-byte floats too).
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}

#: Bytes per element of the whole-byte dtypes (sub-byte ones, ``F4`` and ``F6_*``, are absent).
DTYPE_SIZES: Mapping[str, int] = {
    name: bits // 8 for name, bits in DTYPE_BITS.items() if bits % 8 == 0
}


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """One tensor of a safetensors file; ``start``/``end`` are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        """The tensor's size in bytes (``end - start``)."""
        return self.end - self.start

    @property
    def numel(self) -> int:
        """The number of elements (1 for a scalar, 0 for an empty tensor)."""
        return math.prod(self.shape)

    def absolute_offset(self, data_offset: int) -> int:
        """The tensor's first byte in the file, given the header's ``data_offset``."""
        return data_offset + self.start


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    """A validated header: tensors in data-offset order, and the optional string metadata."""

    header_size: int
    tensors: tuple[TensorInfo, ...]
    metadata: dict[str, str] | None

    @property
    def data_offset(self) -> int:
        """Where the data section starts in the file: ``8 + header_size``."""
        return _LENGTH_PREFIX + self.header_size

    @property
    def data_size(self) -> int:
        """The data section's length: the end of the last tensor (0 when there are none)."""
        return self.tensors[-1].end if self.tensors else 0

    @property
    def file_size(self) -> int:
        """The size a well-formed file with this header has."""
        return self.data_offset + self.data_size

    def by_name(self) -> dict[str, TensorInfo]:
        """The tensors keyed by name."""
        return {tensor.name: tensor for tensor in self.tensors}


def parse_header(
    prefix: bytes | bytearray | memoryview, *, file_size: int | None = None
) -> SafetensorsHeader:
    """Parse and validate a header from ``prefix``, the file's first ``8 + n`` bytes (or more).

    With ``file_size`` the data section must end exactly at the end of the file, as the reference
    implementation requires; without it only the header's internal consistency is checked.
    Raises ``HeaderError`` for anything malformed, and never another exception.
    """
    view = memoryview(prefix)
    if len(view) < _LENGTH_PREFIX:
        raise HeaderError(
            f"truncated: {len(view)} bytes, need at least {_LENGTH_PREFIX} for the header length"
        )
    (header_size,) = struct.unpack_from("<Q", view, 0)
    _check_header_size(header_size, file_size=file_size)
    end = _LENGTH_PREFIX + header_size
    if len(view) < end:
        raise HeaderError(f"truncated header: {len(view) - _LENGTH_PREFIX} of {header_size} bytes")
    header = _parse_json(bytes(view[_LENGTH_PREFIX:end]), header_size=header_size)
    if file_size is not None and header.file_size != file_size:
        raise HeaderError(
            f"data section does not cover the file: tensors end at byte {header.file_size}, "
            f"the file has {file_size} bytes"
        )
    return header


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path`` (reads only the header).

    Raises ``HeaderError`` for a malformed file and ``OSError`` when it cannot be read.
    """
    with Path(path).open("rb") as handle:
        file_size = os.fstat(handle.fileno()).st_size
        length = handle.read(_LENGTH_PREFIX)
        if len(length) < _LENGTH_PREFIX:
            raise HeaderError(f"truncated: the file has {file_size} bytes, fewer than 8")
        (header_size,) = struct.unpack("<Q", length)
        _check_header_size(header_size, file_size=file_size)
        body = handle.read(header_size)
    return parse_header(length + body, file_size=file_size)


def encode_header(
    tensors: Sequence[tuple[str, str, Sequence[int], int]],
    metadata: Mapping[str, str] | None = None,
) -> tuple[bytes, list[int]]:
    """Encode a header for ``(name, dtype, shape, nbytes)`` tensors packed in the given order.

    Returns the bytes to write first (the 8-byte length and the JSON, padded with spaces to a
    multiple of 8 like the ``safetensors`` writer, so the data section stays 8-byte aligned) and
    each tensor's start offset relative to the data section. Raises ``HeaderError`` when a tensor
    is inconsistent (unknown dtype, ``nbytes`` not matching the shape, a duplicate name).
    """
    document: dict[str, Any] = {}
    if metadata is not None:
        document[_METADATA_KEY] = {str(key): str(value) for key, value in metadata.items()}
    starts: list[int] = []
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        if name == _METADATA_KEY or name in document:
            raise HeaderError(f"duplicate or reserved tensor name {name!r}")
        expected = _span(name, dtype, tuple(shape))
        if expected != nbytes:
            raise HeaderError(
                f"tensor {name!r}: {nbytes} bytes given, shape {list(shape)} of {dtype} "
                f"needs {expected}"
            )
        document[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        starts.append(offset)
        offset += nbytes
    # Compact separators and raw UTF-8: what serde_json writes, so headers match the package's.
    body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body, starts


def _check_header_size(header_size: int, *, file_size: int | None) -> None:
    if header_size > MAX_HEADER_SIZE:
        raise HeaderError(
            f"header length {header_size} is larger than the {MAX_HEADER_SIZE}-byte limit"
        )
    if file_size is not None and _LENGTH_PREFIX + header_size > file_size:
        raise HeaderError(
            f"header length {header_size} runs past the end of the {file_size}-byte file"
        )


def _reject_constant(name: str) -> Any:
    raise HeaderError(f"bad JSON: {name} is not allowed")


def _parse_int(text: str) -> int:
    # serde reads integers as u64: "-0" and every negative are refused, whatever their value.
    return -1 if text.startswith("-") else int(text)


def _reject_float(text: str) -> Any:
    raise HeaderError(f"bad JSON: the number {text} is not a non-negative integer")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise HeaderError(f"duplicate key {key!r} in the header")
        result[key] = value
    return result


def _parse_json(raw: bytes, *, header_size: int) -> SafetensorsHeader:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        raise HeaderError(f"header is not UTF-8: {error}") from None
    try:
        document = json.loads(
            text,
            object_pairs_hook=_no_duplicates,
            parse_int=_parse_int,
            parse_float=_reject_float,
            parse_constant=_reject_constant,
        )
    except HeaderError:
        raise
    except (ValueError, RecursionError) as error:
        # ValueError covers JSONDecodeError and over-long integer literals.
        raise HeaderError(f"bad JSON in header: {error}") from None
    if not isinstance(document, dict):
        raise HeaderError(f"header is not a JSON object but {type(document).__name__}")
    metadata = _metadata(document.pop(_METADATA_KEY, None))
    tensors = sorted(
        (_tensor(name, entry) for name, entry in document.items()),
        key=lambda tensor: (tensor.start, tensor.end, tensor.name),
    )
    position = 0
    for tensor in tensors:
        if tensor.start != position:
            kind = "gap before" if tensor.start > position else "overlap at"
            raise HeaderError(
                f"{kind} tensor {tensor.name!r}: it starts at {tensor.start}, the previous "
                f"tensor ends at {position} (tensors must pack the data section contiguously)"
            )
        position = tensor.end
    return SafetensorsHeader(header_size=header_size, tensors=tuple(tensors), metadata=metadata)


def _check_text(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise HeaderError(f"{what} {value!r} holds a lone surrogate") from None
    return value


def _metadata(raw: Any) -> dict[str, str] | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise HeaderError(f"__metadata__ must be an object of strings, not {type(raw).__name__}")
    for key, value in raw.items():
        _check_text(key, "metadata key")
        if not isinstance(value, str):
            raise HeaderError(f"__metadata__[{key!r}] must be a string, not {type(value).__name__}")
        _check_text(value, "metadata value")
    return dict(raw)


def _u64(value: Any, what: str) -> int:
    # bool is an int subclass; JSON true/false are not numbers.
    if type(value) is not int:
        raise HeaderError(f"{what} must be a non-negative integer, not {value!r}")
    if value < 0:
        raise HeaderError(f"{what} must be non-negative")
    if value > _U64_MAX:
        raise HeaderError(f"{what} {value} does not fit in 64 bits")
    return value


def _span(name: str, dtype: str, shape: tuple[int, ...]) -> int:
    bits = DTYPE_BITS.get(dtype)
    if bits is None:
        raise HeaderError(
            f"tensor {name!r}: unknown dtype {dtype!r} (known: {', '.join(DTYPE_BITS)})"
        )
    # Checked multiplication in shape order, as the reference does: it stops at the first
    # overflow, which also keeps a hostile shape from building a huge integer.
    numel = 1
    for dim in shape:
        numel *= dim
        if numel > _U64_MAX:
            raise HeaderError(f"tensor {name!r}: shape {list(shape)[:8]} overflows 64 bits")
    total_bits = numel * bits
    if total_bits > _U64_MAX:
        raise HeaderError(f"tensor {name!r}: shape {list(shape)[:8]} overflows 64 bits")
    if total_bits % 8:
        raise HeaderError(
            f"tensor {name!r}: shape {list(shape)} of {dtype} is not a whole number of bytes"
        )
    return total_bits // 8


def _tensor(name: str, entry: Any) -> TensorInfo:
    _check_text(name, "tensor name")
    if not isinstance(entry, dict):
        raise HeaderError(f"tensor {name!r}: entry must be an object, not {type(entry).__name__}")
    missing = _TENSOR_FIELDS - entry.keys()
    if missing:
        raise HeaderError(f"tensor {name!r}: missing {', '.join(sorted(missing))}")
    unknown = entry.keys() - _TENSOR_FIELDS
    if unknown:
        raise HeaderError(f"tensor {name!r}: unknown fields {', '.join(sorted(unknown))}")
    dtype = entry["dtype"]
    if not isinstance(dtype, str):
        raise HeaderError(f"tensor {name!r}: dtype must be a string, not {dtype!r}")
    raw_shape = entry["shape"]
    if not isinstance(raw_shape, list):
        raise HeaderError(f"tensor {name!r}: shape must be a list, not {raw_shape!r}")
    shape = tuple(_u64(dim, f"tensor {name!r}: shape dimension") for dim in raw_shape)
    offsets = entry["data_offsets"]
    if not isinstance(offsets, list) or len(offsets) != 2:
        raise HeaderError(f"tensor {name!r}: data_offsets must be [start, end], not {offsets!r}")
    start = _u64(offsets[0], f"tensor {name!r}: data_offsets start")
    end = _u64(offsets[1], f"tensor {name!r}: data_offsets end")
    if end < start:
        raise HeaderError(f"tensor {name!r}: data_offsets end {end} is before start {start}")
    expected = _span(name, dtype, shape)
    if end - start != expected:
        raise HeaderError(
            f"tensor {name!r}: span {end - start} bytes, but shape {list(shape)} of {dtype} "
            f"needs {expected}"
        )
    return TensorInfo(name=name, dtype=dtype, shape=shape, start=start, end=end)
