"""``file://`` sources: a directory on the node's own disk."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import anyio

from cache_node.errors import OriginError, OriginNotFound
from cache_node.origins.base import OriginFile, Snapshot, SourceRef, safe_relative_path
from cache_node.origins.patterns import select_files
from loader.preads import read_at

_READ_BLOCK = 4 * 1024 * 1024


class LocalOrigin:
    """A local directory as an origin. Symlinks are not followed (I8).

    A local directory has no immutable revision, so the revision is a digest of the listing
    (paths, sizes, mtimes): a changed file is a new revision, never mixed into an old one.
    """

    scope = "local"

    def __init__(self, ref: SourceRef, *, include: Sequence[str] | None = None) -> None:
        self.ref = ref
        self.root = Path(ref.location)
        self.include = include

    async def resolve(self) -> Snapshot:
        return await anyio.to_thread.run_sync(self._resolve)

    def _resolve(self) -> Snapshot:
        if not self.root.is_dir() or self.root.is_symlink():
            raise OriginNotFound(f"no such directory: {self.ref.location}")
        found: dict[str, os.stat_result] = {}
        for directory, dirnames, filenames in os.walk(self.root, followlinks=False):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(directory) / name
                if path.is_symlink() or not path.is_file():
                    continue
                found[path.relative_to(self.root).as_posix()] = path.stat()
        listing = hashlib.sha256()
        files = []
        for rel in select_files(sorted(found), self.include):
            stat = found[safe_relative_path(rel)]
            listing.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            files.append(OriginFile(path=rel, size=stat.st_size))
        revision = f"local-{listing.hexdigest()[:32]}"
        if self.ref.revision is not None and self.ref.revision != revision:
            raise OriginNotFound(
                f"{self.ref.location} changed: revision {self.ref.revision} is no longer there"
            )
        return Snapshot(source=f"file://{self.ref.location}", revision=revision, files=tuple(files))

    async def read_range(self, file: OriginFile, start: int, end: int) -> AsyncIterator[bytes]:
        path = self.root / safe_relative_path(file.path)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise OriginError(f"cannot read {file.path}: {exc.strerror}", retryable=False) from None
        try:
            position = start
            while position < end:
                data = await anyio.to_thread.run_sync(
                    read_at, fd, min(_READ_BLOCK, end - position), position
                )
                if not data:
                    return
                position += len(data)
                yield data
        finally:
            os.close(fd)

    def pin(self, snapshot: Snapshot) -> None:
        """Nothing to adopt: reads name the file by path."""

    async def aclose(self) -> None:
        return None
