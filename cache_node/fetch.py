"""Origin transfers, once per object: the single-flight registry of a node's fetches.

One :class:`Fetcher` per node. ``await fetcher.fetch(origin, file)`` returns the committed
:class:`~cache_node.store.BlobRecord` of ``file``:

- **Single flight** (I4): concurrent callers for the same object and credential scope share one
  transfer; the others wait for its result (never a truncated file: nothing is visible before
  publish).
- **One transfer** (``cache_node.transfer``): parallel ranged parts into a resumable partial,
  hashed behind the download, bounded retries, every declared digest checked, then published.
- **Failures remembered briefly**: a permanent failure answers the callers that come within
  ``negative_cache_s`` without asking the origin again.
- **Region first**: on a node of a region, ``region`` (``cache_node.region.fills``) decides
  where the bytes come from: a peer that holds the object's blob, else the origin under
  region-wide single flight. The transfer and its checks are the same either way.
- **No trust in declared digests** (I1, I7): a blob already stored is reused only for an object
  that was read and hashed to it before in the same credential scope (``cache_node.verified``);
  any other object is fetched and verified, even when its declared sha256 names a stored blob.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from cache_node.errors import InsufficientStorage, IntegrityError, OriginError, WeightCacheError
from cache_node.metrics import NodeMetrics
from cache_node.origins.base import Origin, OriginFile
from cache_node.settings import FetchSettings
from cache_node.store import BlobRecord, BlobStore, Reservation
from cache_node.transfer import Download
from cache_node.verified import VerifiedObjects, object_key

__all__ = ["Fetcher", "ProgressCallback", "transfer_key"]

ProgressCallback = Callable[[int], None]


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


class RegionFill(Protocol):
    """Where a node of a region gets an object's bytes (``cache_node.region.fills``)."""

    async def fill(
        self,
        key: str,
        origin: Origin,
        file: OriginFile,
        download: Callable[[Origin, OriginFile], Awaitable[BlobRecord]],
    ) -> BlobRecord: ...


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
        #: Set on a node of a region: fills go through it (peers first, one origin pull).
        self.region: RegionFill | None = None

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

    async def wait_ended(self, timeout_s: float = 10.0) -> None:
        """Wait, at most ``timeout_s``, for the transfers running now to end (after
        :meth:`cancel_all`: their cancellation to finish)."""
        tasks = [t.task for t in self._transfers.values() if t.task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=timeout_s)

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

        async def download(source: Origin, source_file: OriginFile) -> BlobRecord:
            return await Download(
                self.store,
                self.settings,
                self.metrics,
                origin=source,
                file=source_file,
                key=transfer.key,
                progress=transfer.advance,
                sleep=self._sleep,
            ).run(own_reservation)

        try:
            if self.region is None:
                record = await download(origin, file)
            else:
                record = await self.region.fill(transfer.key, origin, file, download)
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
