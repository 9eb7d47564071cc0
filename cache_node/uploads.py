"""Blobs a client uploads (engine artifacts): written, hashed and checked by the node itself.

The sender declares the size (``Content-Length``) and the sha256 of what it sends; both are
claims. The node reserves the size before the first byte (507 when it cannot make room),
writes the bytes to a unique temp file while it computes the sha256 of the whole and the
xxh3-128 of every store chunk, and publishes the blob only when the bytes are exactly what
was declared (:class:`~cache_node.errors.UploadIntegrityError` otherwise). Whatever goes
wrong, :meth:`BlobUpload.abort` leaves nothing behind: no temp file, no reservation, no blob.
"""

from __future__ import annotations

import hashlib
from typing import BinaryIO

import xxhash

from cache_node.disk import is_no_space
from cache_node.errors import UploadIntegrityError
from cache_node.store import CHUNK_SIZE, BlobRecord, BlobStore, Reservation, check_sha256

__all__ = ["BlobUpload"]


class BlobUpload:
    """One upload into ``store`` of ``size`` bytes whose sender says they hash to ``sha256``.

    ``reservation`` holds the space (it is consumed by :meth:`publish` or released by
    :meth:`abort`). Not thread-safe: one writer, in order.
    """

    def __init__(
        self, store: BlobStore, *, size: int, sha256: str, reservation: Reservation
    ) -> None:
        self.store = store
        self.size = size
        self.declared = check_sha256(sha256)
        self.reservation = reservation
        self.path = store.new_temp_path()
        self.received = 0
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 (closed in finish)
        self._sha256 = hashlib.sha256()
        self._chunk = xxhash.xxh3_128()
        self._chunk_fill = 0
        self._chunks: list[str] = []
        self._published = False

    def write(self, data: bytes | memoryview) -> None:
        """Append ``data``; UploadIntegrityError past the declared size, 507 on a full disk."""
        if self._file is None:
            raise ValueError("the upload is finished")
        if self.received + len(data) > self.size:
            raise UploadIntegrityError(
                f"more than the {self.size} bytes declared", declared_size=self.size
            )
        try:
            self._file.write(data)
        except OSError as exc:
            if is_no_space(exc):
                raise self.store.no_space("taking an upload", exc) from exc
            raise
        self.received += len(data)
        self._sha256.update(data)
        view = memoryview(data)
        while view:
            take = min(len(view), CHUNK_SIZE - self._chunk_fill)
            self._chunk.update(view[:take])
            self._chunk_fill += take
            view = view[take:]
            if self._chunk_fill == CHUNK_SIZE:
                self._chunks.append(self._chunk.hexdigest())
                self._chunk = xxhash.xxh3_128()
                self._chunk_fill = 0

    def finish(self) -> str:
        """Close the file and check it is what was declared; returns the sha256."""
        if self._file is not None:
            try:
                self._file.close()
            except OSError as exc:
                if is_no_space(exc):
                    raise self.store.no_space("taking an upload", exc) from exc
                raise
            self._file = None
            if self._chunk_fill or not self._chunks:
                self._chunks.append(self._chunk.hexdigest())
        if self.received != self.size:
            raise UploadIntegrityError(
                f"{self.received} bytes arrived, {self.size} were declared",
                declared_size=self.size,
                received=self.received,
            )
        actual = self._sha256.hexdigest()
        if actual != self.declared:
            raise UploadIntegrityError(
                f"the bytes hash to sha256 {actual}, the sender declared {self.declared}",
                declared=self.declared,
                actual=actual,
            )
        return actual

    def publish(self) -> BlobRecord:
        """Make the checked bytes a blob (``finish`` first); the reservation is consumed."""
        sha256 = self.finish()
        record = self.store.publish(
            self.path,
            sha256=sha256,
            size=self.size,
            chunk_xxh3_128=list(self._chunks),
            verified=True,  # the sender declared the digest and the bytes matched it
            reservation=self.reservation,
        )
        self._published = True
        return record

    def abort(self) -> None:
        """Drop the upload (a no-op after :meth:`publish`): temp file and reservation go."""
        if self._published:
            return
        if self._file is not None:
            self._file.close()
            self._file = None
        self.path.unlink(missing_ok=True)
        self.reservation.release()
