"""The tokens file, followed while the node runs: rotate or revoke a token without a restart.

Every process of a node (the API and each data-plane worker) holds a :class:`TokensFile`: the
config parsed from the last version of ``serve --tokens FILE`` that was good, and the identity
of the version it last looked at (device, inode, size, mtime and ctime, so an in-place edit, a
rename over the file and Kubernetes' symlink swap of a Secret volume are all seen). A
:class:`TokensWatcher` thread compares that identity with the file's every
``tokens_check_interval_s`` (1 s) and re-reads the file when it differs; ``SIGHUP`` makes it
re-read at once, changed or not.

A version that cannot be used (unreadable, gone, not JSON, not a tokens file, a tenant's local
root outside the node's) changes nothing: the process keeps the config it had, logs
``tokens.reload_failed`` (with the reason, never a token), counts it, and says so in
``/readyz`` and ``/metrics`` until a good version comes. Auth never turns off because a file
went bad: only a node started without ``--tokens`` has it off.

A data-plane worker started again after it died, while the file is bad, starts from the bytes
of the config its supervisor last accepted (``fallback``), so it keeps the node's tokens rather
than failing to start or reading an older file.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from cache_node.events import emit
from cache_node.worker_stats import read_totals

if TYPE_CHECKING:
    from cache_node.access import AccessConfig

__all__ = ["TokensCollector", "TokensFile", "TokensProblem", "TokensWatcher", "tokens_warning"]

log = logging.getLogger("weightcache.tokens")

#: What identifies one version of the file; ("unreadable", errno) while it cannot be read.
Signature = tuple[Any, ...]


def file_signature(path: Path) -> Signature:
    """The identity of the file's current version (``stat`` follows symlinks, as a read does)."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("unreadable", exc.errno)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


@dataclass(frozen=True)
class TokensProblem:
    """Why the version on disk is not the one in force."""

    reason: str
    since: float  # wall-clock time of the first failed read of this bad spell


class TokensFile:
    """One process's view of the tokens file: the config in force, re-read when it changes.

    ``check()`` is called by a :class:`TokensWatcher` thread; ``config`` is swapped in one
    assignment, so request handlers read it without a lock.
    """

    def __init__(
        self,
        path: Path,
        parse: Callable[[bytes], AccessConfig],
        *,
        process: str,
        fallback: bytes | None = None,
        on_result: Callable[[bool], None] | None = None,
        report: bool = True,
    ) -> None:
        self.path = path
        self.process = process  # "api" or "data_plane", in events and metrics
        self._parse = parse
        self._on_result = on_result
        self._report = report  # False: a copy kept only as a fallback (no events, no counts)
        self._lock = threading.Lock()
        self.reloads = 0  # versions taken into force after the first
        self.failures = 0  # versions (or forced re-reads) that could not be used
        self.problem: TokensProblem | None = None
        signature = file_signature(path)
        try:
            good = path.read_bytes()
            config = parse(good)
        except (OSError, ValueError) as exc:
            if fallback is None:
                raise ValueError(_reason(path, exc)) from None
            config, good = parse(fallback), fallback
            self._failed(_reason(path, exc))
        self.config: AccessConfig = config
        self.good_bytes = good  # what a restarted worker starts from
        self._seen = signature

    def check(self, *, force: bool = False) -> bool:
        """Re-read the file if it changed since the last look (or always, with ``force``).

        True when a new version took effect. A version that cannot be used keeps the config
        in force and is reported once (again only when forced or when the file changes).
        """
        with self._lock:
            signature = file_signature(self.path)
            if signature == self._seen and not force:
                return False
            self._seen = signature
            try:
                good = self.path.read_bytes()
                config = self._parse(good)
            except (OSError, ValueError) as exc:
                self._failed(_reason(self.path, exc))
                return False
            old, recovered = self.config.tokens, self.problem is not None
            self.config, self.good_bytes, self.problem = config, good, None
            if self._report:
                self.reloads += 1
                emit("tokens.reloaded", process=self.process, path=str(self.path),
                     entries=len(config.tokens), added=len(config.tokens.keys() - old.keys()),
                     removed=len(old.keys() - config.tokens.keys()),
                     changed=sum(1 for t in old.keys() & config.tokens.keys()
                                 if old[t] != config.tokens[t]),
                     recovered=recovered, forced=force)
                if self._on_result is not None:
                    self._on_result(True)
            return True

    def _failed(self, reason: str) -> None:
        since = self.problem.since if self.problem is not None else time.time()
        self.problem = TokensProblem(reason=reason, since=since)
        if not self._report:
            return
        self.failures += 1
        emit("tokens.reload_failed", level=logging.ERROR, process=self.process,
             path=str(self.path), reason=reason, action="kept the tokens last read")
        if self._on_result is not None:
            self._on_result(False)


def _reason(path: Path, exc: Exception) -> str:
    if isinstance(exc, OSError):
        return f"cannot read the tokens file {path}: {exc.strerror or exc}"
    return str(exc)


class TokensWatcher:
    """A daemon thread that checks a :class:`TokensFile` every ``interval_s``.

    :meth:`poke` (safe from a signal handler: it only sets an event) makes it re-read the file
    at once, changed or not: what ``SIGHUP`` does.
    """

    def __init__(self, tokens: TokensFile, *, interval_s: float) -> None:
        self.tokens = tokens
        self.interval_s = interval_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._forced = False
        self._thread: threading.Thread | None = None

    def start(self) -> TokensWatcher:
        self._thread = threading.Thread(target=self._run, name="tokens-file", daemon=True)
        self._thread.start()
        return self

    def poke(self) -> None:
        self._forced = True
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.interval_s)
            if self._stop.is_set():
                return
            self._wake.clear()
            forced, self._forced = self._forced, False
            try:
                self.tokens.check(force=forced)
            except Exception:  # the watcher must outlive one bad pass
                log.exception("checking the tokens file failed")


def tokens_warning(tokens: TokensFile | None, stats_directory: Path) -> dict[str, Any] | None:
    """For ``/readyz``: None while every process uses the file on disk; otherwise what is
    wrong. A warning, not a reason to take the node out of service: it serves with the tokens
    it last read, and an outage of every node at once for one bad edit would be worse."""
    if tokens is None:
        return None
    stale_workers = read_totals(stats_directory)["tokens_stale"]
    problem = tokens.problem
    if problem is None and not stale_workers:
        return None
    warning: dict[str, Any] = {
        "code": "tokens_file_invalid",
        "message": "the tokens file on disk cannot be used; the node keeps serving with the "
        "tokens it last read from it until a good version is written (or SIGHUP is sent)",
        "stale_data_plane_workers": stale_workers,
    }
    if problem is not None:
        warning["reason"] = problem.reason
        warning["since"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(problem.since))
    return warning


class TokensCollector(Collector):
    """The tokens file's reloads in ``/metrics``: the API process's, and the data-plane
    workers' (summed over their stats slots, as the data plane's other counters are). Zeros
    on a node without a tokens file, so that alert rules find the series everywhere."""

    def __init__(self, tokens: TokensFile | None, stats_directory: Path) -> None:
        self.tokens = tokens
        self.stats_directory = stats_directory

    def collect(self) -> Iterator[Any]:
        workers = read_totals(self.stats_directory)
        api_reloads, api_failures, api_stale = 0, 0, 0
        if self.tokens is not None:
            api_reloads, api_failures = self.tokens.reloads, self.tokens.failures
            api_stale = int(self.tokens.problem is not None)
        reloads = CounterMetricFamily(
            "weightcache_tokens_reloads",
            "Re-reads of the tokens file, by process (api, data_plane) and result (ok, failed)",
            labels=["process", "result"],
        )
        reloads.add_metric(["api", "ok"], api_reloads)
        reloads.add_metric(["api", "failed"], api_failures)
        reloads.add_metric(["data_plane", "ok"], workers["tokens_reloads"])
        reloads.add_metric(["data_plane", "failed"], workers["tokens_reload_failures"])
        yield reloads
        stale = GaugeMetricFamily(
            "weightcache_tokens_stale",
            "Processes serving with an older tokens file because the one on disk cannot be used",
            labels=["process"],
        )
        stale.add_metric(["api"], api_stale)
        stale.add_metric(["data_plane"], workers["tokens_stale"])
        yield stale
