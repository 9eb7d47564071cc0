"""The blob store: on-disk layout, atomic publish, space, verified reads, reconcile."""

from __future__ import annotations

import hashlib
import os
import random
import time
from pathlib import Path

import pytest

from cache_node.errors import InsufficientStorage, IntegrityError, NotFound
from cache_node.metadata import DiskcacheKeyValue
from cache_node.store import BlobStore
from loader.digests import chunk_digests

KiB = 1024


def _store(root: Path, capacity: int = 1 << 30) -> BlobStore:
    return BlobStore(root, capacity=capacity, meta=DiskcacheKeyValue(root / "meta"))


def _put(store: BlobStore, data: bytes, *, age_s: float = 0) -> str:
    temp = store.new_temp_path()
    temp.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    store.publish(temp, sha256=sha, size=len(data), chunk_xxh3_128=chunk_digests(data),
                  verified=True)
    if age_s:
        past = time.time() - age_s
        os.utime(store.blob_path(sha), (past, past))
    return sha


def _read(store: BlobStore, sha: str, start: int = 0, end: int | None = None) -> bytes:
    record = store.get(sha)
    assert record is not None
    return b"".join(store.iter_verified(sha, start, record.size if end is None else end))


def test_layout_and_atomic_publish(tmp_path: Path) -> None:
    store = _store(tmp_path)
    data = os.urandom(100 * KiB)
    sha = _put(store, data)
    assert store.blob_path(sha) == tmp_path / "blobs" / sha[:2] / sha
    assert store.blob_path(sha).read_bytes() == data
    assert not list((tmp_path / "tmp").iterdir())  # the temp became the blob
    assert store.usage().committed == len(data)
    assert _read(store, sha, 10, 20) == data[10:20]
    again = _put(store, data)  # the same content twice is stored once
    assert again == sha
    assert store.usage().committed == len(data)
    temp = store.new_temp_path()
    temp.write_bytes(b"short")
    with pytest.raises(IntegrityError):
        store.publish(temp, sha256="0" * 64, size=6, chunk_xxh3_128=[], verified=False)


def test_reservations_bound_the_space(tmp_path: Path) -> None:
    store = _store(tmp_path, capacity=10 * KiB)
    held = store.reserve(6 * KiB)
    started = time.monotonic()
    with pytest.raises(InsufficientStorage):
        store.reserve(5 * KiB)
    assert time.monotonic() - started < 1  # refused at once, nothing fetched
    with pytest.raises(InsufficientStorage):
        store.reserve(12 * KiB)
    held.release()
    store.reserve(10 * KiB).release()
    usage = store.usage()
    assert usage.committed + usage.reserved <= usage.capacity


def test_make_room_is_asked_once_and_may_free_space(tmp_path: Path) -> None:
    store = _store(tmp_path, capacity=10 * KiB)
    old = _put(store, os.urandom(8 * KiB))
    asked: list[int] = []

    def make_room(nbytes: int) -> int:
        asked.append(nbytes)
        return store.delete(old)

    store.make_room = make_room
    store.reserve(5 * KiB).release()
    assert asked == [5 * KiB]
    assert not store.has(old)


def test_a_thousand_random_flips_are_caught_before_the_bytes_leave(tmp_path: Path) -> None:
    store = _store(tmp_path)
    rng = random.Random(7)
    caught = 0
    for _ in range(1000):
        data = rng.randbytes(16 * KiB)
        sha = _put(store, data, age_s=3600)  # an old blob: its chunks get memoised as verified
        assert _read(store, sha) == data
        position = rng.randrange(len(data))
        with open(store.blob_path(sha), "r+b") as handle:
            handle.seek(position)
            handle.write(bytes([data[position] ^ (1 << rng.randrange(8))]))
        with pytest.raises(IntegrityError):
            _read(store, sha, position, position + 1)
        caught += 1
        assert not store.has(sha)  # quarantined: never served again
        assert (tmp_path / "quarantine" / sha).exists()
        (tmp_path / "quarantine" / sha).unlink()
    assert caught == 1000


def test_check_reconciles_disk_with_metadata(tmp_path: Path) -> None:
    store = _store(tmp_path)
    kept = _put(store, os.urandom(4 * KiB))
    missing = _put(store, os.urandom(4 * KiB))
    truncated = _put(store, os.urandom(4 * KiB))
    flipped = _put(store, os.urandom(4 * KiB))
    store.blob_path(missing).unlink()
    with open(store.blob_path(truncated), "r+b") as handle:
        handle.truncate(100)
    with open(store.blob_path(flipped), "r+b") as handle:
        handle.write(b"\xff\xfe")
    orphan = tmp_path / "blobs" / "ab" / ("ab" + "0" * 62)
    orphan.parent.mkdir(exist_ok=True)
    orphan.write_bytes(b"nobody knows me")
    (tmp_path / "tmp" / "left-behind.tmp").write_bytes(b"x")
    (tmp_path / "tmp" / ("c" * 40 + ".partial")).write_bytes(b"resumable")
    os.symlink("/etc/passwd", tmp_path / "blobs" / "planted")

    reopened = _store(tmp_path)
    report = reopened.check(fix=True, deep=True)
    assert report.temps_removed == 1
    assert report.partials_kept == 1
    assert report.orphans_removed == 1
    assert not orphan.exists()
    assert report.missing == [missing]
    assert set(report.quarantined) == {truncated, flipped}
    assert not (tmp_path / "blobs" / "planted").exists()
    assert [r.sha256 for r in reopened.records()] == [kept]
    assert reopened.usage().committed == 4 * KiB
    for sha in (missing, truncated, flipped):
        with pytest.raises(NotFound):
            list(reopened.iter_verified(sha, 0, 1))


def test_a_flip_within_the_same_timestamp_tick_is_caught(tmp_path: Path) -> None:
    # File times are coarse: a write right after a check can leave mtime unchanged. A blob
    # written that recently is never remembered as verified, so the next read checks again.
    store = _store(tmp_path)
    data = os.urandom(16 * KiB)
    sha = _put(store, data)
    path = store.blob_path(sha)
    assert _read(store, sha) == data
    before = path.stat()
    with open(path, "r+b") as handle:
        handle.write(b"\x00" if data[0] else b"\x01")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # the same tick
    with pytest.raises(IntegrityError):
        _read(store, sha)
