"""Transient failures heal by themselves: when a failed warm is tried again, and the loop.

A warm that failed for a transient reason (``cache_node.errors.is_transient``: the origin's 5xx,
429, timeouts, an unreachable origin) gets ``error.retry_at``: ``base_s`` after the first failure,
doubling with each failure in a row up to ``cap_s`` (``RetrySettings``), never sooner than the
origin's ``Retry-After``. A permanent failure gets ``retry_at: null`` and an ``action`` saying what
a person does (``weightcache warm ID`` re-warms by hand).

The schedule lives in the pipeline records themselves (state ``failed`` with ``retry_at``), so it
survives a restart: :class:`RetryScheduler` reads the registry, starts what is due (a past
``retry_at`` after a restart is due at once) and sleeps until the next one, or until woken by a
new failure. What the status promises is what it does; deleting or re-registering a pipeline
removes its schedule with its record.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

from api.schema import ErrorInfo
from cache_node.errors import OriginError, WeightCacheError, action_for, is_transient
from cache_node.registry import PipelineRecord
from cache_node.settings import RetrySettings

log = logging.getLogger("weightcache.node")
_MIN_WAIT_S = 0.02

__all__ = [
    "RetryScheduler",
    "RetryTarget",
    "backoff_s",
    "due_retries",
    "failure_info",
    "scheduled_error",
]


def backoff_s(failures: int, settings: RetrySettings) -> float:
    """Seconds before the next try after ``failures`` failures in a row (1 → ``base_s``)."""
    exponent = min(max(failures, 1) - 1, 60)  # 2**60 × base is past any cap
    return float(min(settings.cap_s, settings.base_s * 2**exponent))


def failure_info(
    error: WeightCacheError, *, failures: int, settings: RetrySettings, now: float
) -> ErrorInfo:
    """The status's ``error`` for a warm that failed ``failures`` times in a row with ``error``."""
    if is_transient(error) and settings.enabled:
        delay = backoff_s(failures, settings)
        retry_after = error.retry_after if isinstance(error, OriginError) else None
        if retry_after is not None:
            delay = max(delay, retry_after)
        return ErrorInfo(
            code=error.code,
            message=error.message,
            retry_at=now + delay,
            attempts=failures,
            action="retries automatically at retry_at; `weightcache warm ID` tries now",
        )
    action = (
        "automatic retries are off: `weightcache warm ID` tries again"
        if is_transient(error)
        else f"waits for a person: {action_for(error.code)}"
    )
    return ErrorInfo(
        code=error.code, message=error.message, retry_at=None, attempts=failures, action=action
    )


def scheduled_error(
    error: ErrorInfo | None, *, state: str, settings: RetrySettings
) -> ErrorInfo | None:
    """``error`` as a status shows it: a ``retry_at`` only where the scheduler will act on it.

    A record keeps the ``retry_at`` it failed with; a node restarted with retries off, or a
    record no longer ``failed``, has no retry coming, and a status must not promise one.
    """
    if error is None or error.retry_at is None or (state == "failed" and settings.enabled):
        return error
    update: dict[str, object] = {"retry_at": None}
    if not settings.enabled:
        update["action"] = "automatic retries are off: `weightcache warm ID` tries again"
    return error.model_copy(update=update)


@dataclass(frozen=True)
class RetryTarget:
    """A failed warm to try again: a pipeline, or its staged re-registration."""

    tenant: str
    pipeline: str
    staged: bool
    generation: int
    retry_at: float


def _target(record: PipelineRecord, *, staged: bool) -> RetryTarget | None:
    if record.state != "failed" or record.error is None or record.error.retry_at is None:
        return None
    return RetryTarget(record.tenant, record.id, staged, record.generation, record.error.retry_at)


def due_retries(
    records: Iterable[PipelineRecord], *, now: float
) -> tuple[list[RetryTarget], float | None]:
    """The retries due at ``now``, and when the next one not yet due is (None: none left)."""
    due: list[RetryTarget] = []
    upcoming: float | None = None
    for record in records:
        candidates = [_target(record, staged=False)]
        if record.pending is not None:
            candidates.append(_target(record.pending, staged=True))
        for target in candidates:
            if target is None:
                continue
            if target.retry_at <= now:
                due.append(target)
            elif upcoming is None or target.retry_at < upcoming:
                upcoming = target.retry_at
    return due, upcoming


class RetryScheduler:
    """Starts due retries; sleeps until the next one, ``poll_s`` at most, or until woken."""

    def __init__(
        self,
        settings: RetrySettings,
        *,
        records: Callable[[], Iterable[PipelineRecord]],
        retry: Callable[[RetryTarget], Awaitable[None]],
        clock: Callable[[], float],
        each_pass: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self._records = records
        self._retry = retry
        self._clock = clock
        self._each_pass = each_pass
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Look at the schedule again now (a failure just set a ``retry_at``). Loop thread only."""
        self._wake.set()

    async def run(self) -> None:
        """Run until cancelled."""
        while True:
            self._wake.clear()
            upcoming: float | None = None
            try:
                if self._each_pass is not None:
                    self._each_pass()
                if self.settings.enabled:
                    due, upcoming = due_retries(self._records(), now=self._clock())
                    for target in due:
                        await self._retry(target)
            except Exception:  # the loop must outlive one bad pass
                log.exception("retry pass failed")
            wait = self.settings.poll_s
            if upcoming is not None:
                # a floor, so that a clock step can never turn this into a busy loop
                wait = min(wait, max(_MIN_WAIT_S, upcoming - self._clock()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):  # no helper task, unlike wait_for
                    await self._wake.wait()
