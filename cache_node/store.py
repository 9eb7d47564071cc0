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

import xxhash

from cache_node.disk import DiskGuard, allocated_bytes, is_no_space
from cache_node.errors import InsufficientStorage, IntegrityError, InvalidInput, NotFound
from cache_node.metadata import KeyValue

CHUNK_SIZE = 64 * 1024 * 1024
_HEX = frozenset("0123456789abcdef")
_READ_BLOCK = 8 * 1024 * 1024
#: Hashing reads this much at a time: a check holds 1 MiB, not the 64 MiB chunk it covers.
_HASH_BLOCK = 1024 * 1024


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits, else raise InvalidInput (I8)."""
    if len(sha256) != 64 or not set(sha256) <= _HEX:
        raise InvalidInput(f"not a sha256 digest: {sha256[:80]!r}", field="sha256")
    return sha256


def chunk_digests(data: bytes | memoryview, *, chunk_size: int = CHUNK_SIZE) -> list[str]:
    """xxh3-128 hex digests of ``data`` in ``chunk_size`` pieces (for small in-memory blobs)."""
    view = memoryview(data)
    return [
        xxhash.xxh3_128_hexdigest(view[i : i + chunk_size])
        for i in range(0, max(len(view), 1), chunk_size)
    ] if len(view) else [xxhash.xxh3_128_hexdigest(b"")]


@dataclass(frozen=True)
class BlobRecord:
    """Metadata of one committed blob."""

    sha256: str
    size: int
    chunk_size: int
    chunk_xxh3_128: tuple[str, ...]
    verified: bool  # whether the origin declared a digest that the bytes matched (I1)
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunk_xxh3_128": list(self.chunk_xxh3_128),
            "verified": self.verified,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BlobRecord:
        return cls(
            sha256=raw["sha256"],
            size=int(raw["size"]),
            chunk_size=int(raw["chunk_size"]),
            chunk_xxh3_128=tuple(raw["chunk_xxh3_128"]),
            verified=bool(raw["verified"]),
            created_at=float(raw["created_at"]),
        )


@dataclass(frozen=True)
class Usage:
    """Bytes by state (I10)."""

    capacity: int
    committed: int
    reserved: int
    temp: int  # idle partials: transfers nobody fills now, kept to resume
    quarantined: int
    #: What fills in flight have written so far (their partials and shard temps, as allocated
    #: on disk): a part of ``reserved``, never added to it.
    in_flight: int = 0
    #: What the filesystem can still take beyond the reservations not yet written (None: not
    #: checked). The node never promises more than this, whatever its capacity says (I5).
    filesystem_free: int | None = None

    @property
    def free(self) -> int:
        free = self.capacity - self.committed - self.reserved - self.temp
        if self.filesystem_free is not None:
            free = min(free, self.filesystem_free)
        return max(0, free)


@dataclass
class Reservation:
    """Space held for one fill; release it (or let ``publish`` consume it) when done."""

    store: BlobStore
    reservation_id: str
    nbytes: int
    released: bool = False

    def release(self) -> None:
        self.store._release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
        self.capacity = capacity
        self.meta = meta
        #: The filesystem check (statvfs, ballast, disk full); None checks the capacity only.
        self.disk = disk
        self.blobs_dir = root / "blobs"
        self.tmp_dir = root / "tmp"
        self.quarantine_dir = root / "quarantine"
        for d in (self.blobs_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        # Publishing and deleting check and change the metadata and the committed count as one
        # step: two publishes of one sha256 (two shard sets, two keys for one content) must count
        # it once, and two deletes must subtract it once (I5 accounting).
        self._publish_lock = threading.Lock()
        self._reservations: dict[str, int] = {}
        self._active_partials: set[str] = set()
        self._committed = sum(r.size for r in self.records())
        self._on_quarantine = on_quarantine
        # One process owns the store (the node); others (data-plane workers) only read. A
        # reader that finds a bad chunk asks the owner to quarantine it instead of moving the
        # file itself, so the owner's accounting and pipelines never miss a quarantine.
        self.owner = owner
        self._verified: dict[tuple[str, int], tuple[int, int, int]] = {}
        #: Called with the bytes still needed when a reservation does not fit; returns bytes freed.
        self.make_room: Callable[[int], int] | None = None

    # ----------------------------------------------------------------- layout and records
    def blob_path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.blobs_dir / sha256[:2] / sha256

    def get(self, sha256: str) -> BlobRecord | None:
        raw = self.meta.get(f"blob:{check_sha256(sha256)}")
        return None if raw is None else BlobRecord.from_dict(raw)

    def has(self, sha256: str) -> bool:
        return self.get(sha256) is not None

    def records(self) -> Iterator[BlobRecord]:
        for _, raw in self.meta.scan("blob:"):
            yield BlobRecord.from_dict(raw)

    # ----------------------------------------------------------------- space
    def usage(self) -> Usage:
        with self._lock:
            reserved = sum(self._reservations.values())
            committed = self._committed
            filesystem_free = self._filesystem_room()
            in_flight = self._written_by_fills()
        return Usage(
            capacity=self.capacity,
            committed=committed,
            reserved=reserved,
            temp=self._idle_partial_bytes(),
            quarantined=_dir_bytes(self.quarantine_dir),
            filesystem_free=filesystem_free,
            in_flight=in_flight,
        )

    def no_space(self, where: str, exc: BaseException | None = None) -> InsufficientStorage:
        """The 507 for a disk that filled while ``where`` (recorded as disk full)."""
        if self.disk is not None:
            return self.disk.report_full(where, exc)
        return InsufficientStorage(f"disk full while {where}: {exc}", reason="disk_full")

    def is_reserved(self, key: str) -> bool:
        """Whether a fill already holds space for the transfer ``key`` (not yet in flight)."""
        with self._lock:
            return key in self._active_partials

    def carve(self, source: Reservation | None, nbytes: int) -> Reservation:
        """A reservation of ``nbytes`` taken out of ``source`` as far as it goes; the rest is
        reserved anew (evicting, or InsufficientStorage). For a fill that reserved an estimate
        up front and learns the exact size later."""
        if nbytes < 0:
            raise InvalidInput("negative reservation")
        with self._lock:
            take = 0
            if source is not None and not source.released:
                take = min(nbytes, source.nbytes)
                source.nbytes -= take
                self._reservations[source.reservation_id] = source.nbytes
            carved = Reservation(self, uuid.uuid4().hex, take)
            self._reservations[carved.reservation_id] = take
        if take < nbytes:
            try:
                extra = self.reserve(nbytes - take)
            except BaseException:
                with self._lock:  # give the part taken back: the source is as it was
                    self._reservations.pop(carved.reservation_id, None)
                    carved.released = True
                    if source is not None and not source.released:
                        source.nbytes += take
                        self._reservations[source.reservation_id] = source.nbytes
                raise
            with self._lock:
                self._reservations.pop(extra.reservation_id, None)
                extra.released = True
                carved.nbytes += extra.nbytes
                self._reservations[carved.reservation_id] = carved.nbytes
        return carved

    def reserve(self, nbytes: int, *, partial_key: str | None = None) -> Reservation:
        """Hold ``nbytes`` for a fill, evicting through ``make_room`` if needed.

        Raises InsufficientStorage (507) when the bytes cannot fit even after eviction; nothing is
        reserved then, and the caller has fetched nothing yet (I5).
        """
        if nbytes < 0:
            raise InvalidInput("negative reservation")
        if nbytes > self.capacity:
            raise InsufficientStorage(
                f"needs {nbytes} bytes but the node's capacity is {self.capacity}",
                needed=nbytes,
                capacity=self.capacity,
            )
        for attempt in range(2):
            with self._lock:
                if partial_key is not None:
                    self._active_partials.add(partial_key)
                shortfall = self._shortfall(nbytes)
                if shortfall <= 0:
                    reservation_id = uuid.uuid4().hex
                    self._reservations[reservation_id] = nbytes
                    return Reservation(self, reservation_id, nbytes)
                if partial_key is not None:
                    self._active_partials.discard(partial_key)
            if attempt == 0 and self.make_room is not None:
                self.make_room(nbytes)
        raise self.not_enough_space(nbytes)

    def not_enough_space(self, nbytes: int, what: str = "needs") -> InsufficientStorage:
        """The 507 for ``nbytes`` that do not fit, naming the limit that binds: the capacity,
        or the data dir's filesystem when it has less room than the capacity promises."""
        usage = self.usage()
        details: dict[str, Any] = {"needed": nbytes, "free": usage.free,
                                   "capacity": self.capacity}
        room = usage.filesystem_free
        if room is not None and room < usage.capacity - usage.committed - usage.reserved - (
            usage.temp
        ):
            details.update(reason="filesystem_full", filesystem_free=max(0, room))
            return InsufficientStorage(
                f"not enough space: {what} {nbytes} bytes, but the filesystem of the data dir "
                f"({self.root}) has only {max(0, room)} bytes free for it (capacity "
                f"{self.capacity}) after eviction",
                **details,
            )
        return InsufficientStorage(
            f"not enough space: {what} {nbytes} bytes, {usage.free} free of {self.capacity} "
            "after eviction",
            **details,
        )

    def _shortfall(self, nbytes: int) -> int:
        in_use = self._committed + sum(self._reservations.values()) + self._idle_partial_bytes()
        shortfall = in_use + nbytes - self.capacity
        room = self._filesystem_room()
        if room is not None:
            shortfall = max(shortfall, nbytes - room)
        return shortfall

    def _filesystem_room(self) -> int | None:
        """What the filesystem can take beyond the reserved bytes not yet written (hold _lock).

        statvfs already counts the bytes fills have written so far (partials, shard temps), so
        only the rest of each reservation is still to come. The ballast is never free.
        """
        if self.disk is None:
            return None
        to_come = max(0, sum(self._reservations.values()) - self._written_by_fills())
        return self.disk.free() - to_come

    def _written_by_fills(self) -> int:
        """Bytes on disk of the fills in flight: active partials and shard temps (hold _lock).

        Allocated, not apparent, sizes: a transfer's partial is created at its full size and
        filled in place, so its ``st_size`` says nothing of what has arrived.
        """
        written = 0
        for entry in os.scandir(self.tmp_dir):
            name = entry.name
            if name.endswith(".tmp") or (
                name.endswith(".partial") and name.removesuffix(".partial") in self._active_partials
            ):
                written += allocated_bytes(Path(entry.path))
        return written

    def _release(self, reservation: Reservation) -> None:
        with self._lock:
            if not reservation.released:
                self._reservations.pop(reservation.reservation_id, None)
                reservation.released = True

    def release_partial(self, key: str) -> None:
        """Mark a partial transfer as no longer being filled (it then counts as temp)."""
        with self._lock:
            self._active_partials.discard(key)

    def _idle_partial_bytes(self) -> int:
        total = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.name.endswith(".partial"):
                key = entry.name.removesuffix(".partial")
                if key not in self._active_partials:
                    total += entry.stat().st_size
        return total

    # ----------------------------------------------------------------- writing
    def partial_path(self, key: str) -> Path:
        """The stable temp path of a resumable transfer; ``key`` is hex (I8)."""
        if not key or len(key) > 128 or not set(key) <= _HEX:
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
                self.meta.set(f"blob:{sha256}", record.to_dict())
            except BaseException:
                target.unlink(missing_ok=True)  # no record, no file: nothing half-visible (I3)
                raise
            with self._lock:
                if existing is None:  # a record without its file was counted already
                    self._committed += size
                if reservation is not None and not reservation.released:
                    self._reservations.pop(reservation.reservation_id, None)
                    reservation.released = True
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
            self.meta.delete(f"blob:{sha256}")
            with self._lock:
                self._committed -= record.size
            self.blob_path(sha256).unlink(missing_ok=True)
        return record.size

    def quarantine(self, sha256: str, reason: str) -> None:
        """Move a bad blob aside and forget it, so it is never served again and gets re-fetched.

        In a reader process this records a request the owner carries out
        (:meth:`serve_quarantine_requests`); the reader keeps refusing the blob meanwhile,
        since its chunks fail their digests on every read.
        """
        if not self.owner:
            with self._lock:
                for key in [k for k in self._verified if k[0] == sha256]:
                    del self._verified[key]
            self.meta.set(f"{_QUARANTINE_REQUEST}{sha256}", {"reason": reason, "at": time.time()})
            return
        with self._publish_lock:
            record = self.get(sha256)
            self.meta.delete(f"blob:{sha256}")
            with self._lock:
                if record is not None:
                    self._committed -= record.size
                for key in [k for k in self._verified if k[0] == sha256]:
                    del self._verified[key]
            with contextlib.suppress(FileNotFoundError):
                os.replace(self.blob_path(sha256), self.quarantine_dir / sha256)
        if self._on_quarantine is not None:
            self._on_quarantine(sha256, reason)

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

    # ----------------------------------------------------------------- reading
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

    def verify_chunks(self, record: BlobRecord, handle: Any, start: int, end: int) -> None:
        """Check every chunk overlapping ``[start, end)``; quarantine and raise on mismatch (I2)."""
        for index in range(start // record.chunk_size, _ceil_div(end, record.chunk_size)):
            offset = index * record.chunk_size
            length = min(record.chunk_size, record.size - offset)
            digest = _hash_region(handle.fileno(), offset, length)
            if digest != record.chunk_xxh3_128[index]:
                self.quarantine(record.sha256, f"chunk {index} mismatch")
                raise IntegrityError(
                    f"blob {record.sha256} chunk {index} failed verification",
                    sha256=record.sha256,
                    chunk=index,
                )

    def verify_range(self, record: BlobRecord, handle: Any, start: int, end: int) -> None:
        """Check the chunks covering ``[start, end)`` of an open blob, as ``iter_verified`` does.

        For servers that send the bytes themselves (sendfile from ``handle``): the same memo
        (a chunk is hashed once while the file keeps its inode, size and mtime), the same
        quarantine and IntegrityError on a mismatch, and no bytes handed back.
        """
        if not 0 <= start <= end <= record.size:
            raise InvalidInput(f"range {start}-{end} outside blob of {record.size} bytes")
        stat = os.fstat(handle.fileno())
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        for index in range(start // record.chunk_size, _ceil_div(end, record.chunk_size)):
            if self._verified.get((record.sha256, index)) == identity:
                continue
            offset = index * record.chunk_size
            length = min(record.chunk_size, record.size - offset)
            if stat.st_size != record.size or (
                _hash_region(handle.fileno(), offset, length) != record.chunk_xxh3_128[index]
            ):
                self.quarantine(record.sha256, f"chunk {index} mismatch")
                raise IntegrityError(
                    f"blob {record.sha256} chunk {index} failed verification",
                    sha256=record.sha256,
                    chunk=index,
                )
            if _settled(stat):
                self._verified[(record.sha256, index)] = identity

    def iter_verified(
        self, sha256: str, start: int, end: int, *, piece_size: int = _READ_BLOCK
    ) -> Iterator[bytes]:
        """Yield ``[start, end)`` of a blob, each chunk verified before any of it leaves (I2).

        A chunk is hashed as a stream (:meth:`verify_range`, 1 MiB at a time) and then read
        again in pieces of at most ``piece_size`` bytes, so a reader holds one piece, never a
        64 MiB chunk: a slow client costs its piece, whatever the chunk size. The file must keep
        the inode, size and mtime it had when checked (a write voids the check) or the stream
        stops with IntegrityError. A chunk verified earlier is not hashed again while the file
        is unchanged: a replica's range requests hit each 64 MiB chunk several times.
        """
        if piece_size <= 0:
            raise InvalidInput("piece_size must be positive")
        record, handle = self.open(sha256)
        with handle:
            if not 0 <= start <= end <= record.size:
                raise InvalidInput(f"range {start}-{end} outside blob of {record.size} bytes")
            fd = handle.fileno()
            identity = _identity(os.fstat(fd))
            position = start
            while position < end:
                index = position // record.chunk_size
                stop = min(end, (index + 1) * record.chunk_size)
                self.verify_range(record, handle, position, stop)
                while position < stop:
                    if _identity(os.fstat(fd)) != identity:
                        self.quarantine(sha256, "changed while served")
                        raise IntegrityError(
                            f"blob {sha256} was written to while it was served", sha256=sha256
                        )
                    piece = os.pread(fd, min(piece_size, stop - position), position)
                    if not piece:
                        raise IntegrityError(f"blob {sha256} is shorter than its record")
                    yield piece
                    position += len(piece)

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
                    with self._lock:
                        self.meta.delete(f"blob:{sha256}")
                continue
            bad = path.stat().st_size != record.size
            if not bad and deep:
                with open(path, "rb", buffering=0) as handle:
                    try:
                        self.verify_chunks(record, handle, 0, record.size)
                    except IntegrityError:
                        report.quarantined.append(sha256)
                        continue
            if bad:
                report.quarantined.append(sha256)
                if fix:
                    self.quarantine(sha256, "size mismatch at start-up")
        with self._lock:
            self._committed = sum(r.size for r in self.records())
        return report


#: Metadata keys of quarantines a reader process asks the owner for.
_QUARANTINE_REQUEST = "quarantine-request:"

#: File timestamps are coarse (a kernel tick, a few ms). A chunk is remembered as verified only
#: when the file was last written more than this long ago, so any later write, even within the
#: same tick as the check, leaves a different mtime and voids the memo.
_MEMO_SETTLE_NS = 100_000_000


def _identity(stat: os.stat_result) -> tuple[int, int, int]:
    return stat.st_ino, stat.st_size, stat.st_mtime_ns


def _settled(stat: os.stat_result) -> bool:
    return time.time_ns() - stat.st_mtime_ns > _MEMO_SETTLE_NS


def feed_region(fd: int, offset: int, length: int, hasher: Any) -> int:
    """Feed ``length`` bytes of ``fd`` from ``offset`` to ``hasher``; returns the bytes fed
    (fewer when the file is shorter)."""
    position = offset
    stop = offset + length
    while position < stop:
        data = os.pread(fd, min(_HASH_BLOCK, stop - position), position)
        if not data:
            break
        hasher.update(data)
        position += len(data)
    return position - offset


def _hash_region(fd: int, offset: int, length: int) -> str:
    hasher = xxhash.xxh3_128()
    feed_region(fd, offset, length, hasher)
    return str(hasher.hexdigest())


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


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


def _dir_bytes(path: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
