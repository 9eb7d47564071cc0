"""Origin transfers: single flight, parallel ranged reads, hashing behind the download, resume.

One :class:`Fetcher` per node. ``await fetcher.fetch(origin, file)`` returns the committed
:class:`~cache_node.store.BlobRecord` of ``file``:

- **Single flight** (I4): concurrent callers for the same object and credential scope share one
  transfer; the others wait for its result (never a truncated file: nothing is visible before
  publish).
- **Parts**: the file is split into ``part_size`` parts fetched by up to ``concurrency``
  workers, each written at its offset of a stable partial file (``tmp/<key>.partial``).
- **Hashing off the event loop**: a verifier walks the parts in order as they complete, in a worker
  thread, computing the sha256 (plus git sha1 / md5 when the origin declared those) and the 64 MiB
  chunk xxh3-128 digests of the store, so the digests are ready when the last part lands.
- **Resume**: each finished part is fsynced and appended to ``tmp/<key>.journal`` with its xxh3-64.
  After a crash the journal's parts are re-hashed from disk and kept if they match; only the
  rest is asked for again, with ``Range``.
- **Retries**: bounded attempts and time budget, full-jitter backoff, ``Retry-After`` honoured,
  a stalled stream detected and resumed by range (I6).
- **Integrity** (I1): size and every declared digest must match before publish; otherwise the
  partial is removed and :class:`~cache_node.errors.IntegrityError` names expected and actual.
- **No trust in declared digests** (I1, I7): a blob already stored is reused only for an object
  that was read and hashed to it before in the same credential scope (``cache_node.verified``);
  any other object is fetched and verified, even when its declared sha256 names a stored blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import xxhash

from cache_node.disk import is_no_space
from cache_node.errors import (
    InsufficientStorage,
    IntegrityError,
    OriginError,
    WeightCacheError,
)
from cache_node.metrics import NodeMetrics
from cache_node.origins.base import Origin, OriginFile
from cache_node.settings import FetchSettings
from cache_node.store import BlobRecord, BlobStore, Reservation
from cache_node.tasks import run_all
from cache_node.verified import VerifiedObjects, object_key
from loader.digests import BlobHasher, feed_region

ProgressCallback = Callable[[int], None]
#: The verifier reads this much of the partial file at a time.
_HASH_BLOCK = 8 * 1024 * 1024
#: How often finished parts are made durable for resume (seconds).
FLUSH_INTERVAL_S = 0.5


def transfer_key(origin: Origin, source: str, revision: str, file: OriginFile) -> str:
    """The single-flight key of one object under one credential scope (hex, names the partial)."""
    identity = "\n".join(
        [
            origin.scope,
            source,
            revision,
            file.path,
            file.etag or "",
            file.sha256 or "",
            str(file.size),
        ]
    )
    return hashlib.sha256(identity.encode()).hexdigest()[:40]


@dataclass
class _Transfer:
    """One origin transfer in flight, shared by every caller that asked for it."""

    key: str
    size: int
    origin: Origin
    task: asyncio.Task[BlobRecord] | None = None
    bytes_done: int = 0
    listeners: list[ProgressCallback] = field(default_factory=list)

    def advance(self, nbytes: int) -> None:
        self.bytes_done += nbytes
        for listener in list(self.listeners):
            listener(nbytes)


class Fetcher:
    """Pulls origin files into a :class:`BlobStore`, once per object (see module docstring)."""

    def __init__(
        self,
        store: BlobStore,
        settings: FetchSettings,
        *,
        metrics: NodeMetrics | None = None,
        sleep: Callable[[float], Any] = asyncio.sleep,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics or NodeMetrics()
        self._sleep = sleep
        self._transfers: dict[str, _Transfer] = {}
        self.verified = VerifiedObjects(store.meta, store)
        self._recent_failures: dict[str, tuple[float, WeightCacheError]] = {}

    def already_verified(
        self, origin: Origin, file: OriginFile, *, source: str, revision: str
    ) -> BlobRecord | None:
        """The stored blob this object was verified to be in ``origin``'s scope, if any."""
        return self.verified.lookup(object_key(origin.scope, source, revision, file))

    def in_flight(self, key: str) -> bool:
        """Whether a transfer with this key is running now."""
        return key in self._transfers

    def tasks_using(self, origin: Origin) -> list[asyncio.Task[BlobRecord]]:
        """Transfers still reading from ``origin`` (it must stay open until they end)."""
        return [t.task for t in self._transfers.values() if t.origin is origin and t.task]

    def cancel_all(self) -> None:
        """Stop every transfer (node shutdown); partial files stay resumable."""
        for transfer in list(self._transfers.values()):
            if transfer.task is not None:
                transfer.task.cancel()

    async def fetch(
        self,
        origin: Origin,
        file: OriginFile,
        *,
        source: str,
        revision: str,
        reservation: Reservation | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> BlobRecord:
        """The committed blob of ``file``, fetching it unless it is here or already coming.

        "Here" means this very object was read and hashed before with this credential scope:
        a stored blob whose sha256 merely equals the digest the origin declares is not used,
        since a declared digest is a claim anyone can make (see ``cache_node.verified``).
        """
        record = self.already_verified(origin, file, source=source, revision=revision)
        if record is not None:
            self.metrics.cache_requests.labels("hit").inc()
            if reservation is not None:
                reservation.release()
            return record
        key = transfer_key(origin, source, revision, file)
        failure = self._recent_failures.get(key)
        if failure is not None and time.monotonic() - failure[0] < self.settings.negative_cache_s:
            raise failure[1]
        transfer = self._transfers.get(key)
        if transfer is None:
            self.metrics.cache_requests.labels("miss").inc()
            transfer = _Transfer(key=key, size=file.size, origin=origin)
            self._transfers[key] = transfer
            if on_progress is not None:
                transfer.listeners.append(on_progress)
            transfer.task = asyncio.create_task(
                self._run(origin, file, transfer, reservation, source=source, revision=revision),
                name=f"fetch {file.path}",
            )
        else:
            self.metrics.coalesced_waiters.inc()
            if reservation is not None:
                reservation.release()  # the leader holds the space for this object
            if on_progress is not None:
                on_progress(transfer.bytes_done)
                transfer.listeners.append(on_progress)
        assert transfer.task is not None
        try:
            # shield: a caller that goes away (client disconnect) must not cancel the shared fill
            return await asyncio.shield(transfer.task)
        finally:
            if on_progress is not None and on_progress in transfer.listeners:
                transfer.listeners.remove(on_progress)

    async def _run(
        self,
        origin: Origin,
        file: OriginFile,
        transfer: _Transfer,
        reservation: Reservation | None,
        *,
        source: str,
        revision: str,
    ) -> BlobRecord:
        own_reservation = reservation or self.store.reserve(file.size, partial_key=transfer.key)
        try:
            record = await self._transfer(origin, file, transfer, own_reservation)
            # The bytes of this object, read in this scope, hashed to the blob: a fact now.
            self.verified.record(object_key(origin.scope, source, revision, file), record)
        except WeightCacheError as exc:
            self.metrics.origin_fetches.labels(
                "integrity" if isinstance(exc, IntegrityError) else "error"
            ).inc()
            # a full disk may have room a moment later: not an origin answer to remember
            if not (isinstance(exc, OriginError) and exc.retryable) and not isinstance(
                exc, InsufficientStorage
            ):
                self._recent_failures[transfer.key] = (time.monotonic(), exc)
            raise
        except asyncio.CancelledError:
            self.metrics.origin_fetches.labels("cancelled").inc()
            raise
        except BaseException:
            self.metrics.origin_fetches.labels("error").inc()
            raise
        finally:
            own_reservation.release()
            self.store.release_partial(transfer.key)
            self._transfers.pop(transfer.key, None)
        self._recent_failures.pop(transfer.key, None)
        self.metrics.origin_fetches.labels("ok").inc()
        return record

    async def _transfer(
        self,
        origin: Origin,
        file: OriginFile,
        transfer: _Transfer,
        reservation: Reservation,
    ) -> BlobRecord:
        partial = self.store.partial_path(transfer.key)
        journal = _Journal(partial.with_suffix(".journal"), size=file.size, etag=file.etag)
        try:
            return await self._write_and_publish(origin, file, transfer, reservation, journal)
        except Exception as exc:
            if not (isinstance(exc, InsufficientStorage) or is_no_space(exc)):
                raise
            # A full disk: a resumable partial would only hold the space others need now.
            partial.unlink(missing_ok=True)
            journal.remove()
            if isinstance(exc, InsufficientStorage):
                raise
            raise self.store.no_space(f"writing {file.path}", exc) from exc

    async def _write_and_publish(
        self,
        origin: Origin,
        file: OriginFile,
        transfer: _Transfer,
        reservation: Reservation,
        journal: _Journal,
    ) -> BlobRecord:
        partial = self.store.partial_path(transfer.key)
        part_size = max(1, self.settings.part_size)
        parts = [(s, min(s + part_size, file.size)) for s in range(0, file.size, part_size)]
        done = await anyio.to_thread.run_sync(journal.recover, partial, parts)
        fd = os.open(partial, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, file.size)
            ready = [asyncio.Event() for _ in parts]
            for index in done:
                ready[index].set()
                transfer.advance(parts[index][1] - parts[index][0])
            digests = _Digests(file)
            hasher = asyncio.create_task(self._hash_in_order(fd, parts, ready, digests))
            try:
                await self._download_parts(origin, file, fd, parts, done, ready, journal, transfer)
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
        origin: Origin,
        file: OriginFile,
        fd: int,
        parts: list[tuple[int, int]],
        done: set[int],
        ready: list[asyncio.Event],
        journal: _Journal,
        transfer: _Transfer,
    ) -> None:
        queue = [i for i in range(len(parts)) if i not in done]
        queue.reverse()  # pop() from the end takes parts in file order, so hashing keeps up

        async def worker() -> None:
            while queue:
                index = queue.pop()
                start, end = parts[index]
                digest = await self._fetch_part(origin, file, fd, start, end, transfer)
                journal.add_part(index, digest, nbytes=end - start)
                if journal.due():
                    await anyio.to_thread.run_sync(journal.flush, fd)
                ready[index].set()

        await run_all(worker() for _ in range(min(self.settings.concurrency, max(1, len(queue)))))

    async def _fetch_part(
        self,
        origin: Origin,
        file: OriginFile,
        fd: int,
        start: int,
        end: int,
        transfer: _Transfer,
    ) -> int:
        """Write ``[start, end)`` at its offset, retrying from the last byte received."""
        position = start
        part_hash = xxhash.xxh3_64()
        attempt = 0
        deadline = time.monotonic() + self.settings.retry_budget_s
        while True:
            try:
                async for data in _with_stall_timeout(
                    origin.read_range(file, position, end), self.settings.stall_timeout_s
                ):
                    if position + len(data) > end:
                        raise IntegrityError(
                            f"origin sent more than the {end - start} bytes asked for",
                            path=file.path,
                        )
                    await anyio.to_thread.run_sync(_write_and_hash, fd, data, position, part_hash)
                    position += len(data)
                    transfer.advance(len(data))
                    self.metrics.origin_bytes.inc(len(data))
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
        self,
        fd: int,
        parts: list[tuple[int, int]],
        ready: list[asyncio.Event],
        digests: _Digests,
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


class _Digests:
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


class _Journal:
    """The durable record of which parts of a partial file are complete."""

    def __init__(self, path: Path, *, size: int, etag: str | None) -> None:
        self.path = path
        self.header = {"size": size, "etag": etag}
        self._pending: list[dict[str, int]] = []
        self._pending_bytes = 0
        self._flush_bytes = size // 64
        self._flushed_at = time.monotonic()

    def recover(self, partial: Path, parts: list[tuple[int, int]]) -> set[int]:
        """Parts already on disk whose bytes still match the journal (re-hashed from disk)."""
        if not self.path.exists() or not partial.exists():
            self._start()
            return set()
        lines = self.path.read_text().splitlines()
        try:
            header = json.loads(lines[0])
            entries = [json.loads(line) for line in lines[1:] if line.strip()]
        except (IndexError, ValueError):
            self._start()
            return set()
        if header != self.header:
            self._start()
            return set()
        done: set[int] = set()
        fd = os.open(partial, os.O_RDONLY)
        try:
            for entry in entries:
                index, digest = int(entry["part"]), int(entry["xxh3_64"])
                if not 0 <= index < len(parts):
                    continue
                start, end = parts[index]
                hasher = xxhash.xxh3_64()
                complete = feed_region(fd, start, end - start, hasher) == end - start
                if complete and hasher.intdigest() == digest:
                    done.add(index)
        finally:
            os.close(fd)
        return done

    def _start(self) -> None:
        self.path.write_text(json.dumps(self.header) + "\n")

    def add_part(self, index: int, digest: int, *, nbytes: int) -> None:
        """Note a finished part; it reaches the journal at the next :meth:`flush`."""
        self._pending.append({"part": index, "xxh3_64": digest})
        self._pending_bytes += nbytes

    def due(self) -> bool:
        """Whether to make progress durable now.

        An fsync per part costs a large share of a fast transfer, so parts are batched up to
        1/64 of the file (a crash then re-fetches at most that much, never anything wrong)
        or ``FLUSH_INTERVAL_S``, whichever comes first.
        """
        if not self._pending:
            return False
        return (
            self._pending_bytes >= self._flush_bytes
            or time.monotonic() - self._flushed_at >= FLUSH_INTERVAL_S
        )

    def flush(self, fd: int) -> None:
        """Make the noted parts durable, then record them (in that order)."""
        pending, self._pending = self._pending, []
        self._pending_bytes = 0
        self._flushed_at = time.monotonic()
        if not pending:
            return
        os.fsync(fd)  # the bytes are on disk before the journal says so
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(entry) + "\n" for entry in pending))
            handle.flush()
            os.fsync(handle.fileno())

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
