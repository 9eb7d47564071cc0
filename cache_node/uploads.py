"""Blobs a client uploads (engine artifacts): written, hashed and checked by the node itself.

The sender declares the size (``Content-Length``) and the sha256 of what it sends; both are
claims. The node reserves the size before the first byte (507 when it cannot make room),
writes the bytes to a unique temp file while it computes the sha256 of the whole and the
xxh3-128 of every store chunk, and publishes the blob only when the bytes are exactly what
was declared (:class:`~cache_node.errors.UploadIntegrityError` otherwise). Whatever goes
wrong, :meth:`BlobUpload.abort` leaves nothing behind: no temp file, no reservation, no blob.
"""

from __future__ import annotations

from typing import BinaryIO

from cache_node.disk import is_no_space
from cache_node.errors import UploadIntegrityError
from cache_node.store import BlobRecord, BlobStore, Reservation, check_sha256
from loader.digests import BlobHasher

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
        self._hasher = BlobHasher()
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
        self._hasher.update(data)

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
            self._chunks = self._hasher.chunks()
        if self.received != self.size:
            raise UploadIntegrityError(
                f"{self.received} bytes arrived, {self.size} were declared",
                declared_size=self.size,
                received=self.received,
            )
        actual = self._hasher.sha256_hex
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
