"""The safetensors header parser agrees with the ``safetensors`` package, and rejects bad input."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loader.errors import HeaderError
from loader.safetensors_format import (
    DTYPE_BITS,
    DTYPE_SIZES,
    MAX_HEADER_SIZE,
    SafetensorsHeader,
    encode_header,
    parse_header,
    read_header,
)

# ---------------------------------------------------------------------------------------------
# helpers


def _raw(header: str | bytes, data: bytes = b"", *, length: int | None = None) -> bytes:
    body = header.encode("utf-8") if isinstance(header, str) else header
    return struct.pack("<Q", len(body) if length is None else length) + body + data


def _package_table(blob: bytes) -> dict[str, tuple[str, tuple[int, ...], bytes]] | None:
    """What the reference implementation reads from ``blob``, or None when it refuses it."""
    try:
        entries = safetensors.deserialize(blob)  # type: ignore[no-untyped-call]  # untyped stub
    except Exception:  # the package raises SafetensorError, and sometimes others on junk
        return None
    return {
        name: (info["dtype"], tuple(info["shape"]), bytes(info["data"])) for name, info in entries
    }


def _our_table(
    header: SafetensorsHeader, blob: bytes
) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    base = header.data_offset
    return {t.name: (t.dtype, t.shape, blob[base + t.start : base + t.end]) for t in header.tensors}


def _tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=generator).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=generator).half(),
        "f32": torch.randn(3, 5, generator=generator),
        "f64": torch.randn(2, generator=generator).double(),
        "i64": torch.arange(5, dtype=torch.int64),
        "i32": torch.arange(6, dtype=torch.int32).reshape(2, 3),
        "i16": torch.arange(4, dtype=torch.int16),
        "i8": torch.tensor([-1, 2, -3], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "fp8_e4m3": torch.randn(7, generator=generator).to(torch.float8_e4m3fn),
        "fp8_e5m2": torch.randn(5, generator=generator).to(torch.float8_e5m2),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "empty_bf16": torch.zeros(3, 0, dtype=torch.bfloat16),
    }


# ---------------------------------------------------------------------------------------------
# valid files: agreement with the package


def test_agrees_with_package_on_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file(_tensors(), path, metadata={"format": "pt", "ünï": "çödé"})
    blob = path.read_bytes()
    header = read_header(path)
    assert header == parse_header(blob, file_size=len(blob))
    assert header.metadata == {"format": "pt", "ünï": "çödé"}
    assert header.file_size == len(blob)
    assert _our_table(header, blob) == _package_table(blob)
    starts = [t.start for t in header.tensors]
    assert starts == sorted(starts)
    # Every tensor's bytes are what torch reads back.
    loaded = safetensors.torch.load_file(path)
    for tensor in header.tensors:
        assert tuple(loaded[tensor.name].shape) == tensor.shape
        assert loaded[tensor.name].nbytes == tensor.nbytes
    assert header.by_name()["scalar"].shape == ()
    assert header.by_name()["scalar"].numel == 1
    assert header.by_name()["empty"].nbytes == 0


def test_agrees_with_package_on_numpy_file(tmp_path: Path) -> None:
    path = tmp_path / "np.safetensors"
    arrays: dict[str, npt.NDArray[np.generic]] = {
        "a": np.arange(12, dtype=np.float32).reshape(3, 4),
        "b": np.ones((2, 2, 2), dtype=np.uint16),
        "c": np.array([1, 2], dtype=np.uint32),
        "d": np.array([7], dtype=np.uint64),
        "e": np.zeros((), dtype=np.float16),
    }
    safetensors.numpy.save_file(arrays, path)
    blob = path.read_bytes()
    header = read_header(path)
    assert header.metadata is None
    assert _our_table(header, blob) == _package_table(blob)
    assert {t.name: t.dtype for t in header.tensors} == {
        "a": "F32",
        "b": "U16",
        "c": "U32",
        "d": "U64",
        "e": "F16",
    }


def test_no_tensors_is_valid(tmp_path: Path) -> None:
    blob = _raw("{}")
    header = parse_header(blob, file_size=len(blob))
    assert header.tensors == ()
    assert header.data_size == 0
    assert _package_table(blob) == {}


def test_prefix_without_file_size_is_enough_for_the_header() -> None:
    blob = _raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy")
    header = parse_header(blob[: 8 + header_len(blob)])
    assert header.tensors[0].absolute_offset(header.data_offset) == len(blob) - 2


def header_len(blob: bytes) -> int:
    return int(struct.unpack_from("<Q", blob)[0])


def test_sub_byte_dtypes_follow_the_package() -> None:
    blob = _raw('{"x":{"dtype":"F4","shape":[2,3],"data_offsets":[0,3]}}', b"abc")
    assert _our_table(parse_header(blob, file_size=len(blob)), blob) == _package_table(blob)
    odd = _raw('{"x":{"dtype":"F4","shape":[3],"data_offsets":[0,2]}}', b"ab")
    assert _package_table(odd) is None
    with pytest.raises(HeaderError, match="whole number of bytes"):
        parse_header(odd)


def test_dtype_tables() -> None:
    assert DTYPE_SIZES["BF16"] == 2
    assert DTYPE_SIZES["F8_E4M3"] == 1
    assert "F4" not in DTYPE_SIZES
    assert DTYPE_BITS["F6_E2M3"] == 6
    # Every dtype we know, the package knows too, with the same size.
    for dtype, bits in DTYPE_BITS.items():
        numel = 8
        nbytes = numel * bits // 8
        blob = _raw(
            json.dumps({"t": {"dtype": dtype, "shape": [numel], "data_offsets": [0, nbytes]}}),
            bytes(nbytes),
        )
        assert _package_table(blob) is not None, dtype
        parse_header(blob, file_size=len(blob))


# ---------------------------------------------------------------------------------------------
# encoding


def test_encode_header_matches_the_package_byte_for_byte(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tensors = {k: v for k, v in _tensors().items() if v.nbytes}  # no ties at equal offsets
    safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
    blob = path.read_bytes()
    header = read_header(path)
    encoded, starts = encode_header(
        [(t.name, t.dtype, t.shape, t.nbytes) for t in header.tensors], header.metadata
    )
    assert encoded == blob[: header.data_offset]
    assert starts == [t.start for t in header.tensors]


def test_encoded_file_loads_in_the_package(tmp_path: Path) -> None:
    source = _tensors()
    names = sorted(source)
    encoded, starts = encode_header(
        [
            (name, _torch_code(source[name]), tuple(source[name].shape), source[name].nbytes)
            for name in names
        ],
        {"k": "v"},
    )
    assert len(encoded) % 8 == 0
    data = b"".join(_bytes_of(source[name]) for name in names)
    path = tmp_path / "ours.safetensors"
    path.write_bytes(encoded + data)
    loaded = safetensors.torch.load_file(path)
    assert loaded.keys() == source.keys()
    for name in names:
        assert _bytes_of(loaded[name]) == _bytes_of(source[name])
    header = read_header(path)
    assert {t.name: t.start for t in header.tensors} == dict(zip(names, starts, strict=True))


def test_encode_header_rejects_inconsistent_tensors() -> None:
    with pytest.raises(HeaderError, match="needs 8"):
        encode_header([("a", "F32", (2,), 4)])
    with pytest.raises(HeaderError, match="unknown dtype"):
        encode_header([("a", "F31", (2,), 8)])
    with pytest.raises(HeaderError, match="duplicate"):
        encode_header([("a", "U8", (1,), 1), ("a", "U8", (1,), 1)])
    with pytest.raises(HeaderError, match="reserved"):
        encode_header([("__metadata__", "U8", (1,), 1)])


def _torch_code(tensor: torch.Tensor) -> str:
    codes = {
        torch.bfloat16: "BF16",
        torch.float16: "F16",
        torch.float32: "F32",
        torch.float64: "F64",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
        torch.float8_e4m3fn: "F8_E4M3",
        torch.float8_e5m2: "F8_E5M2",
    }
    return codes[tensor.dtype]


def _bytes_of(tensor: torch.Tensor) -> bytes:
    return bytes(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


# ---------------------------------------------------------------------------------------------
# malformed input: a clear error, and the package refuses it too

_T = '"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}'

MALFORMED: dict[str, tuple[bytes, str]] = {
    "empty file": (b"", "truncated"),
    "short length": (b"\x02\x00\x00", "truncated"),
    "length over the limit": (
        struct.pack("<Q", MAX_HEADER_SIZE + 1) + b"{}",
        "larger than",
    ),
    "length past end of file": (_raw("{}", length=4096), "past the end"),
    "huge length": (struct.pack("<Q", 2**64 - 1), "larger than"),
    "truncated header": (_raw("{" + _T + "}")[:20], "past the end"),
    "non-utf8": (
        _raw(b'{"\xff\xfe":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', b"x"),
        "UTF-8",
    ),
    "utf8 bom": (_raw("\ufeff{}"), "bad JSON"),
    "bad json": (_raw('{"a":'), "bad JSON"),
    "trailing nul": (_raw("{" + _T + "}\x00", b"xy"), "bad JSON"),
    "trailing comma": (_raw("{" + _T + ",}", b"xy"), "bad JSON"),
    "NaN": (_raw('{"__metadata__":{"k":NaN},' + _T + "}", b"xy"), "NaN"),
    "not an object": (_raw("[1,2]"), "not a JSON object"),
    "string document": (_raw('"x"'), "not a JSON object"),
    "entry not object": (_raw('{"a":[1]}'), "must be an object"),
    "missing shape": (_raw('{"a":{"dtype":"U8","data_offsets":[0,2]}}', b"xy"), "missing shape"),
    "dtype not string": (
        _raw('{"a":{"dtype":8,"shape":[2],"data_offsets":[0,2]}}', b"xy"),
        "dtype",
    ),
    "unknown dtype": (
        _raw('{"a":{"dtype":"U9","shape":[2],"data_offsets":[0,2]}}', b"xy"),
        "unknown dtype",
    ),
    "lowercase dtype": (
        _raw('{"a":{"dtype":"u8","shape":[2],"data_offsets":[0,2]}}', b"xy"),
        "unknown dtype",
    ),
    "negative shape": (
        _raw('{"a":{"dtype":"U8","shape":[-2],"data_offsets":[0,2]}}', b"xy"),
        "non-negative",
    ),
    "negative zero shape": (
        _raw('{"a":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
        "non-negative",
    ),
    "float shape": (
        _raw('{"a":{"dtype":"U8","shape":[2.0],"data_offsets":[0,2]}}', b"xy"),
        "integer",
    ),
    "exponent shape": (
        _raw('{"a":{"dtype":"U8","shape":[2e0],"data_offsets":[0,2]}}', b"xy"),
        "integer",
    ),
    "bool shape": (
        _raw('{"a":{"dtype":"U8","shape":[true],"data_offsets":[0,1]}}', b"x"),
        "integer",
    ),
    "string shape": (_raw('{"a":{"dtype":"U8","shape":"2","data_offsets":[0,2]}}', b"xy"), "list"),
    "shape over u64": (
        _raw('{"a":{"dtype":"U8","shape":[18446744073709551616],"data_offsets":[0,2]}}', b"xy"),
        "64 bits",
    ),
    "shape product overflow": (
        _raw('{"a":{"dtype":"U8","shape":[4294967296,4294967296],"data_offsets":[0,0]}}'),
        "overflows",
    ),
    "huge integer literal": (
        _raw('{"a":{"dtype":"U8","shape":[' + "9" * 5000 + '],"data_offsets":[0,0]}}'),
        "bad JSON",
    ),
    "three offsets": (
        _raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2,3]}}', b"xy"),
        "data_offsets",
    ),
    "negative offset": (
        _raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[-1,1]}}', b"xy"),
        "non-negative",
    ),
    "end before start": (
        _raw('{"a":{"dtype":"U8","shape":[0],"data_offsets":[2,0]}}', b"xy"),
        "before start",
    ),
    "gap at start": (_raw('{"a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}}', b"xy"), "gap"),
    "gap between": (
        _raw(
            '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
            '"b":{"dtype":"U8","shape":[1],"data_offsets":[2,3]}}',
            b"xyz",
        ),
        "gap",
    ),
    "overlap": (
        _raw(
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
            '"b":{"dtype":"U8","shape":[2],"data_offsets":[1,3]}}',
            b"xyz",
        ),
        "overlap",
    ),
    "same span twice": (
        _raw(
            '{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},'
            '"b":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
            b"xy",
        ),
        "overlap",
    ),
    "shape x dtype != span": (
        _raw('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"wxyz"),
        "needs 8",
    ),
    "data shorter than header says": (_raw("{" + _T + "}", b"x"), "does not cover"),
    "data longer than header says": (_raw("{" + _T + "}", b"xyz"), "does not cover"),
    "data with no tensors": (_raw("{}", b"x"), "does not cover"),
    "metadata not object": (_raw('{"__metadata__":[1],' + _T + "}", b"xy"), "__metadata__"),
    "metadata int value": (_raw('{"__metadata__":{"k":1},' + _T + "}", b"xy"), "must be a string"),
    "duplicate metadata": (
        _raw('{"__metadata__":{},"__metadata__":{},' + _T + "}", b"xy"),
        "duplicate",
    ),
    "lone surrogate name": (
        _raw('{"\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"xy"),
        "surrogate",
    ),
    "lone surrogate metadata": (
        _raw('{"__metadata__":{"k":"\\udfff"},' + _T + "}", b"xy"),
        "surrogate",
    ),
    "deep nesting": (_raw('{"__metadata__":' + "[" * 100_000 + "]" * 100_000 + "}"), "JSON"),
}

# Rejected on purpose although the package (which keeps the last duplicate, ignores extra
# fields) accepts them: no safetensors writer produces such a header.
STRICTER: dict[str, tuple[bytes, str]] = {
    "duplicate tensor": (_raw("{" + _T + "," + _T + "}", b"xy"), "duplicate"),
    "unknown field": (
        _raw('{"a":{"dtype":"U8","shape":[2],"data_offsets":[0,2],"x":1}}', b"xy"),
        "unknown fields",
    ),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_rejects_malformed(case: str, tmp_path: Path) -> None:
    blob, message = MALFORMED[case]
    with pytest.raises(HeaderError, match=message):
        parse_header(blob, file_size=len(blob))
    path = tmp_path / "bad.safetensors"
    path.write_bytes(blob)
    with pytest.raises(HeaderError):
        read_header(path)
    assert _package_table(blob) is None, "the package accepts what we refuse"


@pytest.mark.parametrize("case", sorted(STRICTER))
def test_stricter_than_package(case: str) -> None:
    blob, message = STRICTER[case]
    assert _package_table(blob) is not None
    with pytest.raises(HeaderError, match=message):
        parse_header(blob, file_size=len(blob))


def test_truncated_prefix_without_file_size() -> None:
    blob = _raw("{" + _T + "}", b"xy")
    with pytest.raises(HeaderError, match="truncated header"):
        parse_header(blob[:20])


def test_header_error_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="truncated: 0 bytes"):
        parse_header(b"")


# ---------------------------------------------------------------------------------------------
# fuzz: either a header the package accepts with the same table, or HeaderError


def _check_against_package(blob: bytes) -> None:
    try:
        header = parse_header(blob, file_size=len(blob))
    except HeaderError:
        return
    package = _package_table(blob)
    assert package is not None, "we accepted a file the package refuses"
    assert _our_table(header, blob) == package


_DTYPES = sorted(DTYPE_BITS)


@st.composite
def _valid_files(draw: st.DrawFn) -> bytes:
    count = draw(st.integers(min_value=0, max_value=4))
    names = draw(
        st.lists(st.text(min_size=1, max_size=6), min_size=count, max_size=count, unique=True)
    )
    names = [name for name in names if name != "__metadata__"]
    tensors: list[tuple[str, str, tuple[int, ...], int]] = []
    for name in names:
        dtype = draw(st.sampled_from(_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        bits = 1
        for dim in shape:
            bits *= dim
        bits *= DTYPE_BITS[dtype]
        if bits % 8:
            shape = (*shape, 8)
            bits *= 8
        tensors.append((name, dtype, shape, bits // 8))
    metadata = draw(
        st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
    )
    header, _ = encode_header(tensors, metadata)
    return header + bytes(sum(t[3] for t in tensors))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_files())
def test_fuzz_valid_files_round_trip(blob: bytes) -> None:
    header = parse_header(blob, file_size=len(blob))
    assert _our_table(header, blob) == _package_table(blob)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_valid_files(), st.data())
def test_fuzz_mutated_headers(blob: bytes, data: st.DataObject) -> None:
    mutable = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        position = data.draw(st.integers(0, max(len(mutable) - 1, 0)))
        if kind == "flip" and mutable:
            mutable[position] ^= 1 << data.draw(st.integers(0, 7))
        elif kind == "set" and mutable:
            mutable[position] = data.draw(st.sampled_from(b'{}[]",:-.0123456789 eE\\\x00\xff'))
        elif kind == "insert":
            mutable[position:position] = data.draw(st.binary(min_size=1, max_size=4))
        elif kind == "delete" and mutable:
            del mutable[position]
        elif kind == "truncate":
            del mutable[position:]
    _check_against_package(bytes(mutable))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_fuzz_random_bytes(blob: bytes) -> None:
    _check_against_package(blob)


@settings(max_examples=200, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers(-3, 2**65) | st.text(max_size=5),
        lambda children: (
            st.lists(children, max_size=3)
            | st.dictionaries(
                st.sampled_from(["a", "b", "dtype", "shape", "data_offsets", "__metadata__"]),
                children,
                max_size=4,
            )
        ),
        max_leaves=12,
    ),
    st.binary(max_size=16),
)
def test_fuzz_json_documents(document: Any, data: bytes) -> None:
    _check_against_package(_raw(json.dumps(document), data))
