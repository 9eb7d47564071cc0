"""The blob store: content-addressed, crash-safe, verified on read, with space accounting.

On-disk layout under the data dir (a tested contract, see ``tests/test_store.py``)::

    blobs/ab/<sha256>        every file and rank shard, written once, never mutated
    tmp/<key>.partial        a resumable origin transfer (+ ``<key>.journal``: parts on disk)
    tmp/<unique>.tmp         any other temp (shards being written); removed at start-up
    quarantine/<sha256>      blobs that failed verification, kept for inspection, not counted
    meta/                    metadata (diskcache), ``blob:<sha256>`` records

Publishing (I3): unique temp → fsync → rename → dir fsync → metadata commit, in that order, so a
crash anywhere leaves nothing visible or a complete verified blob. Space (I5): a fill reserves its
bytes before any origin byte, and committed + reserved + idle partials never exceed the capacity.

The store is put together from one module per concept: ``blob_records`` (what is recorded of a
blob), ``blob_space`` (the space account and reservations), ``blob_checks`` (verify on read and
quarantine); this module owns the layout, publishing, deleting, quarantine and the reconcile.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_node.blob_checks import ChunkChecks
from cache_node.blob_records import (
    RECORD_PREFIX,
    BlobRecord,
    check_sha256,
    is_hex,
    record_key,
)
from cache_node.blob_space import BlobSpace, MakeRoom, Reservation, Usage
from cache_node.disk import DiskGuard, is_no_space
from cache_node.errors import InsufficientStorage, IntegrityError, InvalidInput, NotFound
from cache_node.metadata import KeyValue
from loader.digests import CHUNK_SIZE

__all__ = [
    "BlobRecord",
    "BlobStore",
    "CheckReport",
    "Reservation",
    "Usage",
    "check_sha256",
]

#: ``iter_verified`` hands out at most this many bytes at a time by default.
_READ_BLOCK = 8 * 1024 * 1024
#: Metadata keys of quarantines a reader process asks the owner for.
_QUARANTINE_REQUEST = "quarantine-request:"


@dataclass
class CheckReport:
    """What a reconcile found and did."""

    temps_removed: int = 0
    partials_kept: int = 0
    orphans_removed: int = 0
    missing: list[str] = field(default_factory=list)
    quarantined: list[str] = field(default_factory=list)


class BlobStore:
    """Content-addressed blobs on local disk, with metadata in a :class:`KeyValue`."""

    def __init__(
        self,
        root: Path,
        *,
        capacity: int,
        meta: KeyValue,
        on_quarantine: Callable[[str, str], None] | None = None,
        owner: bool = True,
        disk: DiskGuard | None = None,
    ) -> None:
        self.root = root
        self.meta = meta
        #: The filesystem check (statvfs, ballast, disk full); None checks the capacity only.
        self.disk = disk
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (self.blobs_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        # Publishing and deleting check and change the metadata and the committed count as one
        # step: two publishes of one sha256 (two shard sets, two keys for one content) must count
        # it once, and two deletes must subtract it once (I5 accounting).
        self._publish_lock = threading.Lock()
        self.space = BlobSpace(
            root=root,
            tmp_dir=self.tmp_dir,
            quarantine_dir=self.quarantine_dir,
            capacity=capacity,
            committed=sum(r.size for r in self.records()),
            disk=disk,
        )
        self.checks = ChunkChecks(self.quarantine)
        self._on_quarantine = on_quarantine
        # One process owns the store (the node); others (data-plane workers) only read. A
        # reader that finds a bad chunk asks the owner to quarantine it instead of moving the
        # file itself, so the owner's accounting and pipelines never miss a quarantine.
        self.owner = owner
        #: Called with the bytes still needed when a reservation does not fit; returns bytes freed.
        self.make_room: MakeRoom | None = None
        #: Called (from any thread) after a blob was published, deleted or quarantined.
        self.on_change: Callable[[], None] | None = None

    @property
    def capacity(self) -> int:
        """The bytes this store may hold (committed + reserved + idle partials)."""
        return self.space.capacity

    # ----------------------------------------------------------------- layout and records
    def blob_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.blobs_dir / sha256[:2] / sha256

    def get(self, sha256: str) -> BlobRecord | None:
        raw = self.meta.get(record_key(sha256))
        return None if raw is None else BlobRecord.from_dict(raw)

    def has(self, sha256: str) -> bool:
        return self.get(sha256) is not None

    def records(self) -> Iterator[BlobRecord]:
        for _, raw in self.meta.scan(RECORD_PREFIX):
            yield BlobRecord.from_dict(raw)

    # ----------------------------------------------------------------- space (see blob_space)
    def usage(self) -> Usage:
        return self.space.usage()

    def no_space(self, where: str, exc: BaseException | None = None) -> InsufficientStorage:
        """The 507 for a disk that filled while ``where`` (recorded as disk full)."""
        return self.space.no_space(where, exc)

    def is_reserved(self, key: str) -> bool:
        """Whether a fill already holds space for the transfer ``key`` (not yet in flight)."""
        return self.space.is_reserved(key)

    def carve(self, source: Reservation | None, nbytes: int) -> Reservation:
        """``nbytes`` taken out of ``source`` as far as it goes, the rest reserved anew."""
        return self.space.carve(source, nbytes, make_room=self.make_room)

    def reserve(self, nbytes: int, *, partial_key: str | None = None) -> Reservation:
        """Hold ``nbytes`` for a fill, evicting through ``make_room`` if needed (or 507)."""
        return self.space.reserve(nbytes, partial_key=partial_key, make_room=self.make_room)

    def not_enough_space(self, nbytes: int, what: str = "needs") -> InsufficientStorage:
        """The 507 for ``nbytes`` that do not fit, naming the limit that binds."""
        return self.space.not_enough_space(nbytes, what)

    def release_partial(self, key: str) -> None:
        """Mark a partial transfer as no longer being filled (it then counts as temp)."""
        self.space.release_partial(key)

    # ----------------------------------------------------------------- writing
    def partial_path(self, key: str) -> Path:
        """The stable temp path of a resumable transfer; ``key`` is hex (I8)."""
        if not key or len(key) > 128 or not is_hex(key):
            raise InvalidInput(f"bad transfer key {key!r}")
        return self.tmp_dir / f"{key}.partial"

    def new_temp_path(self) -> Path:
        """A unique temp path (one writer per file: correctness never depends on a lock)."""
        return self.tmp_dir / f"{uuid.uuid4().hex}.tmp"

    def publish(
        self,
        temp: Path,
        *,
        sha256: str,
        size: int,
        chunk_xxh3_128: list[str],
        verified: bool,
        reservation: Reservation | None = None,
    ) -> BlobRecord:
        """Make a fully written, hashed temp file visible as blob ``sha256`` (I3)."""
        check_sha256(sha256)
        if temp.stat().st_size != size:
            raise IntegrityError(
                f"temp file is {temp.stat().st_size} bytes, expected {size}", sha256=sha256
            )
        try:
            _fsync_file(temp)  # outside the lock: the slow part, and one writer per temp
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if is_no_space(exc):
                raise self.no_space("making a blob durable", exc) from exc
            raise
        with self._publish_lock:
            existing = self.get(sha256)
            if existing is not None and self.blob_path(sha256).exists():
                temp.unlink(missing_ok=True)
                if reservation is not None:
                    reservation.release()
                return existing
            target = self.blob_path(sha256)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(temp, target)
            _fsync_dir(target.parent)
            _fsync_dir(temp.parent)
            record = BlobRecord(
                sha256=sha256,
                size=size,
                chunk_size=CHUNK_SIZE,
                chunk_xxh3_128=tuple(chunk_xxh3_128),
                verified=verified,
                created_at=time.time(),
            )
            try:
                self.meta.set(record_key(sha256), record.to_dict())
            except BaseException:
                target.unlink(missing_ok=True)  # no record, no file: nothing half-visible (I3)
                raise
            # a record without its file was counted already
            self.space.commit(size if existing is None else 0, reservation)
        self._changed()
        return record

    def delete(self, sha256: str) -> int:
        """Forget and unlink a blob: metadata first, so nothing points at a missing file.

        A reader that already has the file open keeps reading it (unlink while open).
        Returns the bytes freed.
        """
        with self._publish_lock:
            record = self.get(sha256)
            if record is None:
                return 0
            self.meta.delete(record_key(sha256))
            self.space.uncommit(record.size)
            self.blob_path(sha256).unlink(missing_ok=True)
        self._changed()
        return record.size

    def quarantine(self, sha256: str, reason: str) -> None:
        """Move a bad blob aside and forget it, so it is never served again and gets re-fetched.

        In a reader process this records a request the owner carries out
        (:meth:`serve_quarantine_requests`); the reader keeps refusing the blob meanwhile,
        since its chunks fail their digests on every read.
        """
        if not self.owner:
            self.checks.forget(sha256)
            self.meta.set(f"{_QUARANTINE_REQUEST}{sha256}", {"reason": reason, "at": time.time()})
            return
        with self._publish_lock:
            record = self.get(sha256)
            self.meta.delete(record_key(sha256))
            if record is not None:
                self.space.uncommit(record.size)
            self.checks.forget(sha256)
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.blob_path(sha256), self.quarantine_dir / sha256)
        self._changed()
        if self._on_quarantine is not None:
            self._on_quarantine(sha256, reason)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def serve_quarantine_requests(self) -> int:
        """Quarantine the blobs reader processes found bad (the owner's side); returns how many."""
        served = 0
        for key, raw in list(self.meta.scan(_QUARANTINE_REQUEST)):
            sha256 = key.removeprefix(_QUARANTINE_REQUEST)
            self.meta.delete(key)
            if self.get(sha256) is not None:
                self.quarantine(sha256, f"{raw.get('reason', 'bad chunk')} (found by a reader)")
                served += 1
        return served

    # ----------------------------------------------------------------- reading (see blob_checks)
    def open(self, sha256: str) -> tuple[BlobRecord, Any]:
        """The record and an open binary file of a committed blob; NotFound otherwise."""
        record = self.get(sha256)
        if record is None:
            raise NotFound(f"blob {sha256} is not on this node")
        try:
            handle = open(self.blob_path(sha256), "rb", buffering=0)  # noqa: SIM115
        except FileNotFoundError:
            self.quarantine(sha256, "missing")
            raise NotFound(f"blob {sha256} is not on this node") from None
        return record, handle

    def verify_range(self, record: BlobRecord, handle: Any, start: int, end: int) -> None:
        """Check the chunks covering ``[start, end)`` of an open blob, as ``iter_verified`` does.

        For servers that send the bytes themselves (sendfile from ``handle``): the same memo,
        the same quarantine and IntegrityError on a mismatch, and no bytes handed back.
        """
        self.checks.verify_range(record, handle, start, end)

    def iter_verified(
        self, sha256: str, start: int, end: int, *, piece_size: int = _READ_BLOCK
    ) -> Iterator[bytes]:
        """Yield ``[start, end)`` of a blob, each chunk verified before any of it leaves (I2).

        A chunk is hashed as a stream (1 MiB at a time) and then read again in pieces of at
        most ``piece_size`` bytes, so a slow client costs its piece, whatever the chunk size.
        The file must keep the inode, size and mtime it had when checked (a write voids the
        check) or the stream stops with IntegrityError. A chunk verified earlier is not hashed
        again while the file is unchanged.
        """
        if piece_size <= 0:
            raise InvalidInput("piece_size must be positive")
        record, handle = self.open(sha256)
        with handle:
            yield from self.checks.iter_verified(
                record, handle, start, end, piece_size=piece_size
            )

    # ----------------------------------------------------------------- reconcile
    def check(
        self, *, fix: bool = True, deep: bool = False, partial_max_age_s: float = 7 * 86400
    ) -> CheckReport:
        """Reconcile metadata with disk at start-up (layout contract, I3).

        Removes unique temps; keeps resumable partials (their journal lets a fill resume)
        unless untouched for ``partial_max_age_s``;
        removes orphan blob files that no record describes; drops records whose file is missing;
        quarantines blobs of the wrong size, and with ``deep`` also those whose chunks mismatch.
        """
        report = CheckReport()
        stale_before = time.time() - partial_max_age_s
        for entry in os.scandir(self.tmp_dir):
            # a resumable transfer nobody came back for in a week is only taking space
            if entry.name.endswith((".partial", ".journal")) and (
                entry.stat().st_mtime >= stale_before
            ):
                report.partials_kept += entry.name.endswith(".partial")
                continue
            report.temps_removed += 1
            if fix:
                Path(entry.path).unlink(missing_ok=True)
        known: dict[str, BlobRecord] = {r.sha256: r for r in self.records()}
        for prefix_dir in os.scandir(self.blobs_dir):
            if not prefix_dir.is_dir(follow_symlinks=False):
                if fix:
                    Path(prefix_dir.path).unlink(missing_ok=True)
                continue
            for entry in os.scandir(prefix_dir.path):
                if entry.name not in known or not entry.is_file(follow_symlinks=False):
                    report.orphans_removed += 1
                    if fix:
                        Path(entry.path).unlink(missing_ok=True)
        for sha256, record in known.items():
            path = self.blob_path(sha256)
            if not path.is_file() or path.is_symlink():
                report.missing.append(sha256)
                if fix:
                    self.meta.delete(record_key(sha256))
                continue
            bad = path.stat().st_size != record.size
            if not bad and deep:
                with open(path, "rb", buffering=0) as handle:
                    try:
                        self.verify_range(record, handle, 0, record.size)
                    except IntegrityError:
                        report.quarantined.append(sha256)
                        continue
            if bad:
                report.quarantined.append(sha256)
                if fix:
                    self.quarantine(sha256, "size mismatch at start-up")
        self.space.recount(sum(r.size for r in self.records()))
        return report


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
