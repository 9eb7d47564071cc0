"""The store's space (I5): bytes committed, reserved for fills, and left on the filesystem.

A fill reserves its bytes before any origin byte arrives, and committed + reserved + idle
partials never exceed the capacity. :class:`BlobSpace` keeps that account for one
:class:`~cache_node.store.BlobStore`: the committed total (changed as blobs are published,
deleted and quarantined), the reservations held, and the resumable partials a fill is writing
(those count inside its reservation; idle ones count as temp). It also asks the filesystem
(through a :class:`~cache_node.disk.DiskGuard`) so the node never promises bytes the disk does
not have, whatever its capacity says.
"""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cache_node.disk import DiskGuard, allocated_bytes
from cache_node.errors import InsufficientStorage, InvalidInput

__all__ = ["BlobSpace", "MakeRoom", "Reservation", "Usage"]

#: Called with the bytes still needed when a reservation does not fit; returns bytes freed.
MakeRoom = Callable[[int], int]


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

    space: BlobSpace
    reservation_id: str
    nbytes: int
    released: bool = False

    def release(self) -> None:
        self.space.release(self)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class BlobSpace:
    """The space account of one store's data dir (see the module docstring)."""

    def __init__(
        self,
        *,
        root: Path,
        tmp_dir: Path,
        quarantine_dir: Path,
        capacity: int,
        committed: int,
        disk: DiskGuard | None = None,
    ) -> None:
        self.root = root
        self.tmp_dir = tmp_dir
        self.quarantine_dir = quarantine_dir
        self.capacity = capacity
        #: The filesystem check (statvfs, ballast, disk full); None checks the capacity only.
        self.disk = disk
        self._lock = threading.Lock()
        self._committed = committed
        self._reservations: dict[str, int] = {}
        self._active_partials: set[str] = set()

    # ----------------------------------------------------------------- reading the account
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

    def is_reserved(self, key: str) -> bool:
        """Whether a fill already holds space for the transfer ``key`` (not yet in flight)."""
        with self._lock:
            return key in self._active_partials

    def no_space(self, where: str, exc: BaseException | None = None) -> InsufficientStorage:
        """The 507 for a disk that filled while ``where`` (recorded as disk full)."""
        if self.disk is not None:
            return self.disk.report_full(where, exc)
        return InsufficientStorage(f"disk full while {where}: {exc}", reason="disk_full")

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

    # ----------------------------------------------------------------- reservations
    def reserve(
        self, nbytes: int, *, partial_key: str | None = None, make_room: MakeRoom | None = None
    ) -> Reservation:
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
                if self._shortfall(nbytes) <= 0:
                    reservation_id = uuid.uuid4().hex
                    self._reservations[reservation_id] = nbytes
                    return Reservation(self, reservation_id, nbytes)
                if partial_key is not None:
                    self._active_partials.discard(partial_key)
            if attempt == 0 and make_room is not None:
                make_room(nbytes)
        raise self.not_enough_space(nbytes)

    def carve(
        self, source: Reservation | None, nbytes: int, *, make_room: MakeRoom | None = None
    ) -> Reservation:
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
                extra = self.reserve(nbytes - take, make_room=make_room)
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

    def release(self, reservation: Reservation) -> None:
        """Give a reservation's bytes back (a second release does nothing)."""
        with self._lock:
            self._release(reservation)

    def release_partial(self, key: str) -> None:
        """Mark a partial transfer as no longer being filled (it then counts as temp)."""
        with self._lock:
            self._active_partials.discard(key)

    # ----------------------------------------------------------------- committed bytes
    def commit(self, nbytes: int, reservation: Reservation | None) -> None:
        """Count ``nbytes`` newly published, consuming the reservation that held them."""
        with self._lock:
            self._committed += nbytes
            if reservation is not None:
                self._release(reservation)

    def uncommit(self, nbytes: int) -> None:
        """Stop counting ``nbytes`` of a blob deleted or quarantined."""
        with self._lock:
            self._committed -= nbytes

    def recount(self, committed: int) -> None:
        """Set the committed total from the records (after a reconcile)."""
        with self._lock:
            self._committed = committed

    # ----------------------------------------------------------------- private (hold _lock)
    def _release(self, reservation: Reservation) -> None:
        if not reservation.released:
            self._reservations.pop(reservation.reservation_id, None)
            reservation.released = True

    def _shortfall(self, nbytes: int) -> int:
        in_use = self._committed + sum(self._reservations.values()) + self._idle_partial_bytes()
        shortfall = in_use + nbytes - self.capacity
        room = self._filesystem_room()
        if room is not None:
            shortfall = max(shortfall, nbytes - room)
        return shortfall

    def _filesystem_room(self) -> int | None:
        """What the filesystem can take beyond the reserved bytes not yet written.

        statvfs already counts the bytes fills have written so far (partials, shard temps), so
        only the rest of each reservation is still to come. The ballast is never free.
        """
        if self.disk is None:
            return None
        to_come = max(0, sum(self._reservations.values()) - self._written_by_fills())
        return self.disk.free() - to_come

    def _written_by_fills(self) -> int:
        """Bytes on disk of the fills in flight: active partials and shard temps.

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

    def _idle_partial_bytes(self) -> int:
        total = 0
        for entry in os.scandir(self.tmp_dir):
            if entry.name.endswith(".partial"):
                key = entry.name.removesuffix(".partial")
                if key not in self._active_partials:
                    total += entry.stat().st_size
        return total


def _dir_bytes(path: Path) -> int:
    return sum(e.stat().st_size for e in os.scandir(path) if e.is_file(follow_symlinks=False))
