"""One origin transfer: parallel ranged reads into a resumable partial, hashed, checked, published.

A :class:`Download` takes one origin object into the store (``cache_node.fetch`` decides which
transfers run and who shares them):

- **Parts**: the file is split into ``part_size`` parts fetched by up to ``concurrency``
  workers, each written at its offset of a stable partial file (``tmp/<key>.partial``).
- **Hashing off the event loop**: a verifier walks the parts in order as they complete, in a worker
  thread, computing the sha256 (plus git sha1 / md5 when the origin declared those) and the 64 MiB
  chunk xxh3-128 digests of the store, so the digests are ready when the last part lands.
- **Resume**: each finished part is fsynced and noted in the transfer's journal
  (``cache_node.transfer_journal``); after a crash only the parts it does not vouch for are
  asked for again, with ``Range``.
- **Retries**: bounded attempts and time budget, full-jitter backoff, ``Retry-After`` honoured,
  a stalled stream detected and resumed by range (I6).
- **Integrity** (I1): size and every declared digest must match before publish; otherwise the
  partial is removed and :class:`~cache_node.errors.IntegrityError` names expected and actual.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import xxhash

from cache_node.blob_records import BlobRecord
from cache_node.blob_space import Reservation
from cache_node.disk import is_no_space
from cache_node.errors import InsufficientStorage, IntegrityError, OriginError
from cache_node.metrics import NodeMetrics
from cache_node.origins.base import Origin, OriginFile
from cache_node.settings import FetchSettings
from cache_node.store import BlobStore
from cache_node.tasks import run_all
from cache_node.transfer_journal import TransferJournal
from loader.digests import BlobHasher, feed_region

__all__ = ["Download", "IngestDigests"]

#: The verifier reads this much of the partial file at a time.
_HASH_BLOCK = 8 * 1024 * 1024


class Download:
    """One origin object into one blob of ``store`` (see the module docstring).

    ``key`` names the partial file (the transfer's single-flight key); ``progress`` is told
    every byte that lands, including the parts a resume keeps.
    """

    def __init__(
        self,
        store: BlobStore,
        settings: FetchSettings,
        metrics: NodeMetrics,
        *,
        origin: Origin,
        file: OriginFile,
        key: str,
        progress: Callable[[int], None],
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.origin = origin
        self.file = file
        self.partial = store.partial_path(key)
        self._progress = progress
        self._sleep = sleep

    async def run(self, reservation: Reservation) -> BlobRecord:
        """Fetch, verify and publish the object; the committed record."""
        file = self.file
        journal = TransferJournal(
            self.partial.with_suffix(".journal"), size=file.size, etag=file.etag
        )
        try:
            return await self._write_and_publish(reservation, journal)
        except Exception as exc:
            if not (isinstance(exc, InsufficientStorage) or is_no_space(exc)):
                raise
            # A full disk: a resumable partial would only hold the space others need now.
            self.partial.unlink(missing_ok=True)
            journal.remove()
            if isinstance(exc, InsufficientStorage):
                raise
            raise self.store.no_space(f"writing {file.path}", exc) from exc

    async def _write_and_publish(
        self, reservation: Reservation, journal: TransferJournal
    ) -> BlobRecord:
        file, partial = self.file, self.partial
        part_size = max(1, self.settings.part_size)
        parts = [(s, min(s + part_size, file.size)) for s in range(0, file.size, part_size)]
        done = await anyio.to_thread.run_sync(journal.recover, partial, parts)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, file.size)
            ready = [asyncio.Event() for _ in parts]
            for index in done:
                ready[index].set()
                self._progress(parts[index][1] - parts[index][0])
            digests = IngestDigests(file)
            hasher = asyncio.create_task(_hash_in_order(fd, parts, ready, digests))
            try:
                await self._download_parts(fd, parts, done, ready, journal)
                await hasher
            except BaseException:
                hasher.cancel()
                raise
            finally:
                with anyio.CancelScope(shield=True):  # keep what arrived for a resume
                    await anyio.to_thread.run_sync(journal.flush, fd)
        finally:
            os.close(fd)
        try:
            digests.check(file)
        except IntegrityError:
            self.metrics.digest_mismatches.labels("ingest").inc()
            partial.unlink(missing_ok=True)
            journal.remove()
            raise
        record = await anyio.to_thread.run_sync(
            lambda: self.store.publish(
                partial,
                sha256=digests.blob.sha256_hex,
                size=file.size,
                chunk_xxh3_128=digests.blob.chunks(),
                verified=file.has_digest,
                reservation=reservation,
            )
        )
        journal.remove()
        return record

    async def _download_parts(
        self,
        fd: int,
        parts: list[tuple[int, int]],
        done: set[int],
        ready: list[asyncio.Event],
        journal: TransferJournal,
    ) -> None:
        queue = [i for i in range(len(parts)) if i not in done]
        queue.reverse()  # pop() from the end takes parts in file order, so hashing keeps up

        async def worker() -> None:
            while queue:
                index = queue.pop()
                start, end = parts[index]
                digest = await self._fetch_part(fd, start, end)
                journal.add_part(index, digest, nbytes=end - start)
                if journal.due():
                    await anyio.to_thread.run_sync(journal.flush, fd)
                ready[index].set()

        await run_all(worker() for _ in range(min(self.settings.concurrency, max(1, len(queue)))))

    async def _fetch_part(self, fd: int, start: int, end: int) -> int:
        """Write ``[start, end)`` at its offset, retrying from the last byte received."""
        file = self.file
        position = start
        part_hash = xxhash.xxh3_64()
        # a region peer is an origin to this transfer, but its bytes cost the origin nothing
        received = (
            self.metrics.peer_bytes if getattr(self.origin, "is_peer", False)
            else self.metrics.origin_bytes
        )
        attempt = 0
        deadline = time.monotonic() + self.settings.retry_budget_s
        while True:
            try:
                async for data in _with_stall_timeout(
                    self.origin.read_range(file, position, end), self.settings.stall_timeout_s
                ):
                    if position + len(data) > end:
                        raise IntegrityError(
                            f"origin sent more than the {end - start} bytes asked for",
                            path=file.path,
                        )
                    await anyio.to_thread.run_sync(_write_and_hash, fd, data, position, part_hash)
                    position += len(data)
                    self._progress(len(data))
                    received.inc(len(data))
                if position == end:
                    return part_hash.intdigest()
                error = OriginError(
                    f"origin stream ended at byte {position} of {file.path}, expected {end}",
                    retryable=True,
                )
            except OriginError as exc:
                error = exc
            attempt += 1
            if not error.retryable or attempt >= self.settings.max_attempts:
                raise _exhausted(error, file, attempt)
            ceiling = self.settings.backoff_base_s * 2 ** (attempt - 1)
            delay = random.uniform(0, min(self.settings.backoff_cap_s, ceiling))  # full jitter
            if error.retry_after is not None:
                delay = max(delay, error.retry_after)
            if time.monotonic() + delay > deadline:
                raise _exhausted(error, file, attempt)
            self.metrics.origin_retries.inc()
            await self._sleep(delay)


async def _hash_in_order(
    fd: int, parts: list[tuple[int, int]], ready: list[asyncio.Event], digests: IngestDigests
) -> None:
    for index, (start, end) in enumerate(parts):
        await ready[index].wait()
        await anyio.to_thread.run_sync(digests.update_from, fd, start, end)


def _exhausted(error: OriginError, file: OriginFile, attempts: int) -> OriginError:
    error.details.update(attempts=attempts, path=file.path)
    if error.retryable:
        error.details["retry_at"] = time.time() + 60
    return error


async def _with_stall_timeout(
    stream: AsyncIterator[bytes], timeout_s: float
) -> AsyncIterator[bytes]:
    iterator = aiter(stream)
    try:
        while True:
            try:
                with anyio.fail_after(timeout_s):
                    data = await anext(iterator)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise OriginError(
                    f"origin stream stalled for {timeout_s:.0f} s", retryable=True
                ) from None
            yield data
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:
            await aclose()


def _write_and_hash(fd: int, data: bytes, offset: int, part_hash: Any) -> None:
    view = memoryview(data)
    while view:
        written = os.pwrite(fd, view, offset)
        view = view[written:]
        offset += written
    part_hash.update(data)


def discard_partial(store: BlobStore, key: str) -> None:
    """Drop transfer ``key``'s partial file and its journal: bytes a source sent that the
    next source must not resume from (a peer that sent other bytes, then failed)."""
    partial = store.partial_path(key)
    partial.unlink(missing_ok=True)
    partial.with_suffix(".journal").unlink(missing_ok=True)


class IngestDigests:
    """Every digest of one origin file, fed in order: the blob's sha256 and chunk digests, plus
    the git sha1 or md5 when those are all the origin declared."""

    def __init__(self, file: OriginFile) -> None:
        self.blob = BlobHasher()
        # The blob is named by its sha256, so that one is always computed; a weaker digest is
        # computed only when the origin declared no sha256 to check against.
        self.git_sha1 = (
            hashlib.sha1(f"blob {file.size}\0".encode())
            if file.git_sha1 and not file.sha256
            else None
        )
        self.md5 = (
            hashlib.md5(usedforsecurity=False)
            if file.md5 and not file.sha256 and not file.git_sha1
            else None
        )

    def update(self, data: bytes) -> None:
        self.blob.update(data)
        if self.git_sha1 is not None:
            self.git_sha1.update(data)
        if self.md5 is not None:
            self.md5.update(data)

    def update_from(self, fd: int, start: int, end: int) -> None:
        """Feed ``[start, end)`` of the partial file; OSError if it is shorter."""
        fed = feed_region(fd, start, end - start, self, block_size=_HASH_BLOCK)
        if fed < end - start:
            raise OSError(f"partial file shorter than expected at byte {start + fed}")

    def check(self, file: OriginFile) -> None:
        """Raise IntegrityError unless every digest the origin declared matches the bytes."""
        expected_actual = [
            ("sha256", file.sha256, self.blob.sha256_hex),
            ("git-sha1", file.git_sha1 if self.git_sha1 else None,
             self.git_sha1.hexdigest() if self.git_sha1 else None),
            ("md5", file.md5 if self.md5 else None, self.md5.hexdigest() if self.md5 else None),
        ]
        for kind, expected, actual in expected_actual:
            if expected and expected.lower() != actual:
                raise IntegrityError(
                    f"{file.path}: origin bytes do not match the declared {kind}: "
                    f"expected {expected}, got {actual}",
                    path=file.path,
                    digest=kind,
                    expected=expected,
                    actual=actual,
                )
