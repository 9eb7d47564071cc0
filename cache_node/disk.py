"""The filesystem under the data dir: free space, a headroom ballast, and "disk full" state.

``--capacity`` is a promise the node makes; the filesystem may be smaller, or another process
may fill it. So every reservation is also checked against ``statvfs`` (see
``BlobStore._shortfall``), and a real ``ENOSPC`` (or a full SQLite metadata store) is handled
here instead of wedging the node:

- **Ballast.** At start the guard pre-allocates ``headroom`` bytes in ``<data_dir>/headroom``
  (``posix_fallocate``: real blocks, not a sparse file). Reservations never count it as free.
  When the disk fills anyway, the ballast is deleted, so the metadata writes that record the
  failure, a deletion or an eviction still find space. It is allocated again once the disk has
  room for it. A second, smaller one (``headroom.startup``) is given up only when the node
  starts on a disk so full that the metadata store cannot open (SQLite writes on open).
- **State.** :meth:`DiskGuard.report_full` marks the disk full (event ``disk.full``, a metric);
  :meth:`DiskGuard.problems` re-checks and says ``disk_full`` until the ballast is back and
  ``headroom`` bytes are free again; ``/readyz`` answers 503 meanwhile.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from cache_node.errors import InsufficientStorage
from cache_node.events import emit

#: The errors that mean "no space on this filesystem" (quota included).
NO_SPACE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
BALLAST_NAME = "headroom"
STARTUP_BALLAST_NAME = "headroom.startup"


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` says the disk (or the SQLite file on it) is full."""
    if isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS:
        return True
    # sqlite3.OperationalError "database or disk is full" (SQLITE_FULL) carries no errno
    return type(exc).__name__ == "OperationalError" and "full" in str(exc).lower()


def fs_free(path: Path) -> int:
    """Bytes an unprivileged writer can still allocate on the filesystem of ``path``."""
    stat = os.statvfs(path)
    return stat.f_bavail * stat.f_frsize


def allocated_bytes(path: Path) -> int:
    """Bytes the filesystem has allocated for ``path`` (a sparse file counts what it holds)."""
    try:
        return os.stat(path).st_blocks * 512
    except FileNotFoundError:
        return 0


class DiskGuard:
    """Free space, ballast and full state of the filesystem holding ``root``."""

    def __init__(
        self,
        root: Path,
        *,
        headroom: int,
        on_full: Callable[[], None] | None = None,
    ) -> None:
        self.root = root
        # On a small filesystem the headroom is at most 1/16 of it: enough for the metadata,
        # and it does not take a big share of what fills could use.
        stat = os.statvfs(root)
        self.headroom = min(headroom, stat.f_blocks * stat.f_frsize // 16)
        self.ballast = root / BALLAST_NAME
        self.startup_ballast = root / STARTUP_BALLAST_NAME
        self.startup_headroom = min(self.headroom, max(1 << 20, self.headroom // 4))
        self._on_full = on_full
        self._lock = threading.Lock()
        self._full = False
        self._reason = ""

    # ----------------------------------------------------------------- space
    def free(self) -> int:
        """Free bytes of the filesystem, the ballast not counted as free."""
        return fs_free(self.root)

    def ensure_ballast(self) -> bool:
        """Allocate the ballasts if missing and the disk has room; whether they are in place."""
        if self.headroom <= 0:
            return True
        with self._lock:
            return self._ensure(self.startup_ballast, self.startup_headroom) and self._ensure(
                self.ballast, self.headroom
            )

    def _ensure(self, path: Path, size: int) -> bool:
        if allocated_bytes(path) >= size:
            return True
        # Only when the ballast leaves as much again: taking the last bytes back from a
        # disk that is still nearly full would fail the next metadata write.
        if fs_free(self.root) + allocated_bytes(path) < 2 * size:
            return False
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            path.unlink(missing_ok=True)
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                # a filesystem that cannot pre-allocate: no ballast, and no alarm about it
                emit("disk.no_headroom", level=logging.WARNING, path=str(self.root),
                     error=str(exc))
                self.headroom = 0
                return True
            if exc.errno not in NO_SPACE_ERRNOS:
                raise
            return False
        return True

    def release_startup_ballast(self) -> None:
        """Give up the last reserve: the node is starting and its metadata cannot open."""
        with self._lock:
            self.startup_ballast.unlink(missing_ok=True)

    def release_ballast(self) -> None:
        """Give the ballast's bytes back to the filesystem (for the writes that must succeed)."""
        with self._lock:
            self.ballast.unlink(missing_ok=True)

    # ----------------------------------------------------------------- full state
    def report_full(self, where: str, exc: BaseException | None = None) -> InsufficientStorage:
        """Record that the disk filled while ``where``; returns the 507 error to raise."""
        self.release_ballast()
        free = self.free()
        with self._lock:
            first = not self._full
            self._full = True
            self._reason = where
        if first:
            emit("disk.full", level=logging.ERROR, path=str(self.root), where=where,
                 free_bytes=free, error=str(exc) if exc else None)
        if self._on_full is not None:
            self._on_full()
        return InsufficientStorage(
            f"disk full: the filesystem of the data dir ({self.root}) ran out of space while "
            f"{where}; {free} bytes free",
            reason="disk_full",
            filesystem_free=free,
        )

    @property
    def full(self) -> bool:
        return self._full

    def problems(self) -> list[str]:
        """``["disk_full"]`` while the disk is full; clears itself once space is back."""
        if self._full:
            if self.ensure_ballast() and self.free() >= max(self.headroom, 1 << 20):
                with self._lock:
                    self._full = False
                emit("disk.recovered", path=str(self.root), free_bytes=self.free())
        elif self.headroom > 0 and not self.ensure_ballast():
            with self._lock:
                self._full = True
                self._reason = "keeping its headroom"
            emit("disk.full", level=logging.ERROR, path=str(self.root),
                 where="keeping its headroom", free_bytes=self.free())
        return ["disk_full"] if self._full else []
