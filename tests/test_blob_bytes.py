"""The one home of byte integrity: exact positioned reads, blob digests, Content-Range."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import xxhash

from loader import digests
from loader.content_range import ContentRange, parse_content_range, parse_unsatisfied_range
from loader.digests import BlobHasher, chunk_digests, feed_region, hash_region
from loader.preads import read_at, read_into_at


def _file(tmp_path: Path, data: bytes) -> int:
    path = tmp_path / "blob"
    path.write_bytes(data)
    return os.open(path, os.O_RDONLY)


@pytest.fixture
def short_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every pread returns at most 3 bytes, as a signal or a network filesystem may."""
    pread, preadv = os.pread, os.preadv

    def short_pread(fd: int, length: int, offset: int) -> bytes:
        return pread(fd, min(length, 3), offset)

    def short_preadv(fd: int, buffers: list[memoryview], offset: int) -> int:
        return preadv(fd, [buffers[0][:3]], offset)

    monkeypatch.setattr(os, "pread", short_pread)
    monkeypatch.setattr(os, "preadv", short_preadv)


@pytest.mark.usefixtures("short_reads")
def test_reads_loop_until_every_byte_or_the_end(tmp_path: Path) -> None:
    data = bytes(range(100))
    fd = _file(tmp_path, data)
    try:
        assert read_at(fd, 40, 10) == data[10:50]
        assert read_at(fd, 40, 80) == data[80:]  # the file ends first
        assert read_at(fd, 5, 100) == b""
        buffer = memoryview(bytearray(30))
        assert read_into_at(fd, buffer, 5) == 30
        assert bytes(buffer) == data[5:35]
        assert read_into_at(fd, buffer, 90) == 10
        assert bytes(buffer[:10]) == data[90:]
    finally:
        os.close(fd)


@pytest.mark.parametrize("size", [0, 1, 99, 100, 101, 250])
def test_blob_hasher_agrees_with_whole_buffer_digests(size: int) -> None:
    data = os.urandom(size)
    hasher = BlobHasher(chunk_size=100)
    for start in range(0, size, 7):  # fed in pieces that straddle chunk edges
        hasher.update(data[start : start + 7])
    expected = [xxhash.xxh3_128_hexdigest(data[i : i + 100]) for i in range(0, size, 100)]
    assert hasher.chunks() == (expected or [xxhash.xxh3_128_hexdigest(b"")])
    assert hasher.chunks() == chunk_digests(data, chunk_size=100)  # closing twice changes nothing
    assert hasher.sha256_hex == hashlib.sha256(data).hexdigest()
    assert hasher.size == size


def test_the_chunk_size_has_one_definition() -> None:
    from cache_node import sharding

    assert digests.CHUNK_SIZE == 64 * 1024 * 1024
    assert sharding.CHUNK_SIZE is digests.CHUNK_SIZE


def test_region_hashing_reads_what_is_there(tmp_path: Path) -> None:
    data = os.urandom(5000)
    fd = _file(tmp_path, data)
    try:
        assert hash_region(fd, 100, 1000) == xxhash.xxh3_128_hexdigest(data[100:1100])
        hasher = hashlib.sha256()
        assert feed_region(fd, 4000, 2000, hasher, block_size=64) == 1000  # past the end
        assert hasher.hexdigest() == hashlib.sha256(data[4000:]).hexdigest()
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-99/1000", ContentRange(0, 99, 1000)),
        (" bytes 5-5/* ", ContentRange(5, 5, None)),
        ("bytes 0-99/", None),
        ("bytes */1000", None),
        ("items 0-99/1000", None),
        ("bytes 0-99/1000, 200-299/1000", None),
        ("bytes \u0661-9/10", None),  # non-ASCII digits are not digits here
        ("", None),
        (None, None),
    ],
)
def test_content_range(value: str | None, expected: ContentRange | None) -> None:
    assert parse_content_range(value) == expected


def test_unsatisfied_content_range() -> None:
    assert parse_unsatisfied_range("bytes */1000") == 1000
    assert parse_unsatisfied_range("bytes 0-1/1000") is None
    assert parse_unsatisfied_range(None) is None
