"""A supervised data plane: workers that die are started again, with backoff.

``weightcache serve`` runs :class:`DataPlane`: N worker processes (``api.data_plane``) on
one port, and a thread that watches them. A worker that exits for any reason (``kill -9``, a
crash, the OOM killer) is started again in the same stats slot, so its counters carry on;
each restart logs ``data_plane.worker_restarted`` and counts in
``weightcache_data_plane_worker_restarts_total``. Restarts of a slot that keeps dying back off
(``restart_backoff_s``, doubled up to ``restart_backoff_cap_s``; reset once a worker has stayed
up for ``healthy_after_s``), so a worker that cannot start does not spin. While no worker is
alive, :meth:`DataPlane.readiness` says so and ``/readyz`` answers 503.

The supervisor follows the tokens file too (quietly: the workers and the API report on it), so
that a worker it starts again while the file on disk is bad starts from the node's last good
tokens, and :meth:`DataPlane.reload_tokens` (``SIGHUP``) is passed on to every worker.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from api.data_plane import (
    run_data_plane,
    start_worker,
    stats_dir,
    stop_data_plane,
    wait_ready,
)
from cache_node.access import open_tokens_file
from cache_node.events import emit
from cache_node.settings import DataPlaneSettings, NodeSettings
from cache_node.worker_stats import read_totals

__all__ = ["DataPlane", "DataPlaneCollector", "restart_delay"]

log = logging.getLogger("weightcache.data_plane")

_RESTART_READY_TIMEOUT_S = 30.0


def restart_delay(failures: int, config: DataPlaneSettings) -> float:
    """Seconds before restarting a worker that died ``failures`` times in a row, each soon
    after its start: the base delay, doubled per failure, capped."""
    exponent = min(max(failures, 1) - 1, 62)  # 2**62 already dwarfs any cap
    return float(min(config.restart_backoff_cap_s, config.restart_backoff_s * 2**exponent))


@dataclass
class _Slot:
    process: subprocess.Popen[bytes]
    started_at: float
    failures: int = 0  # deaths in a row, each soon after its start
    restart_at: float | None = None  # when a dead worker is due to start again


class DataPlane:
    """The data-plane workers of one node and the thread that keeps them running."""

    def __init__(
        self, settings: NodeSettings, *, port: int, workers: int, log_format: str | None = None
    ) -> None:
        self.settings = settings
        self.port = port
        self.workers = workers
        self.log_format = log_format  # the workers log their events as serve does
        self.restarts = 0
        self._tokens = open_tokens_file(settings, process="data_plane", report=False)
        self._tokens_due = 0.0  # monotonic time of the next look at the tokens file
        self._tokens_forced = False
        self._slots: list[_Slot] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> DataPlane:
        """Start every worker (RuntimeError if one cannot), then the supervising thread."""
        now = time.monotonic()
        processes = run_data_plane(
            self.settings, port=self.port, workers=self.workers,
            tokens=self._good_tokens(), log_format=self.log_format,
        )
        self._slots = [_Slot(process=p, started_at=now) for p in processes]
        self._thread = threading.Thread(target=self._watch, name="data-plane", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop supervising, then stop every worker."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=_RESTART_READY_TIMEOUT_S + 5)
        with self._lock:
            processes = [slot.process for slot in self._slots]
        stop_data_plane(processes)

    def reload_tokens(self) -> None:
        """Have every worker re-read the tokens file now (``serve`` calls it on SIGHUP).

        Safe in a signal handler: it sets a flag and sends signals, and takes no lock (the
        thread it interrupts may hold one); a worker that died meanwhile is skipped, and its
        restart reads the file anyway.
        """
        self._tokens_forced = True
        for slot in list(self._slots):
            with contextlib.suppress(ProcessLookupError):
                slot.process.send_signal(signal.SIGHUP)

    def _good_tokens(self) -> bytes | None:
        return None if self._tokens is None else self._tokens.good_bytes

    def _follow_tokens(self) -> None:
        if self._tokens is None:
            return
        now = time.monotonic()
        if now < self._tokens_due and not self._tokens_forced:
            return
        forced, self._tokens_forced = self._tokens_forced, False
        self._tokens_due = now + self.settings.tokens_check_interval_s
        self._tokens.check(force=forced)

    # ------------------------------------------------------------------ state
    def pids(self) -> list[int]:
        """The process id of each slot's current worker (alive or not yet restarted)."""
        with self._lock:
            return [slot.process.pid for slot in self._slots]

    def live_workers(self) -> int:
        """Workers running now (a dead one counts as dead at once, before any restart)."""
        with self._lock:
            return sum(1 for slot in self._slots if slot.process.poll() is None)

    def readiness(self) -> dict[str, Any] | None:
        """None while a worker serves; otherwise why the data plane cannot (for ``/readyz``)."""
        live = self.live_workers()
        if live:
            return None
        return {
            "code": "data_plane_down",
            "message": f"no data plane worker is running on port {self.port} "
            f"(0 of {self.workers}); restarts are under way",
            "workers": self.workers,
            "live": live,
        }

    # ------------------------------------------------------------------ supervision
    def _watch(self) -> None:
        interval = self.settings.data_plane.check_interval_s
        while not self._stop.wait(interval):
            try:
                self._follow_tokens()
            except Exception:  # never a reason to stop supervising
                log.exception("following the tokens file failed")
            for index in range(len(self._slots)):
                try:
                    self._check(index)
                except Exception:  # the supervisor must outlive any one bad restart
                    log.exception("data plane slot %d: supervision failed", index)

    def _check(self, index: int) -> None:
        config = self.settings.data_plane
        with self._lock:
            slot = self._slots[index]
        code = slot.process.poll()
        if code is None:
            return
        now = time.monotonic()
        if slot.restart_at is None:  # just found dead: schedule its restart
            quick = now - slot.started_at < config.healthy_after_s
            slot.failures = slot.failures + 1 if quick else 1
            delay = restart_delay(slot.failures, config)
            slot.restart_at = now + delay
            emit("data_plane.worker_died", level=logging.WARNING, slot=index,
                 pid=slot.process.pid, exit_code=code, restart_in_s=round(delay, 3))
        if now < slot.restart_at or self._stop.is_set():
            return
        process = start_worker(self.settings, port=self.port, slot=index,
                               tokens=self._good_tokens(), log_format=self.log_format)
        try:
            wait_ready(process, deadline=time.monotonic() + _RESTART_READY_TIMEOUT_S)
        except RuntimeError as exc:
            if process.poll() is None:
                process.kill()
            process.wait()
            emit("data_plane.worker_restart_failed", level=logging.ERROR, slot=index,
                 reason=str(exc), attempt=slot.failures)
            replacement = _Slot(process=process, started_at=time.monotonic(),
                                failures=slot.failures)
        else:
            self.restarts += 1
            emit("data_plane.worker_restarted", level=logging.WARNING, slot=index,
                 old_pid=slot.process.pid, pid=process.pid, exit_code=code,
                 attempt=slot.failures, restarts=self.restarts)
            replacement = _Slot(process=process, started_at=time.monotonic(),
                                failures=slot.failures)
        with self._lock:
            self._slots[index] = replacement


class DataPlaneCollector(Collector):
    """The data plane's counters in the node's ``/metrics``: what the workers served (summed
    over their stats slots, dead workers included) and, with a supervisor, its workers."""

    def __init__(self, settings: NodeSettings, plane: DataPlane | None = None) -> None:
        self.directory = stats_dir(settings)
        self.plane = plane

    def collect(self) -> Iterator[Any]:
        totals = read_totals(self.directory)
        yield CounterMetricFamily(
            "weightcache_data_plane_bytes_served",
            "Blob bytes sent by the data plane's workers (sendfile)",
            value=totals["bytes_served"],
        )
        responses = CounterMetricFamily(
            "weightcache_data_plane_responses",
            "Data plane responses by status class",
            labels=["status"],
        )
        for status in ("2xx", "4xx", "5xx"):
            responses.add_metric([status], totals[f"responses_{status}"])
        yield responses
        yield CounterMetricFamily(
            "weightcache_data_plane_meta_reads",
            "Metadata records the data plane read to authorise requests",
            value=totals["meta_reads"],
        )
        if self.plane is not None:
            yield CounterMetricFamily(
                "weightcache_data_plane_worker_restarts",
                "Data plane workers started again after they died",
                value=self.plane.restarts,
            )
            yield GaugeMetricFamily(
                "weightcache_data_plane_workers",
                "Data plane workers running now",
                value=self.plane.live_workers(),
            )
