"""The data plane's worker processes: start them (``python -m api.data_plane --worker``),
wait until each says it listens, and stop them. What one worker serves is in
:mod:`api.data_plane`; :mod:`api.data_plane_supervisor` restarts a worker that dies."""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import IO

from cache_node.settings import NodeSettings
from cache_node.worker_stats import reset_stats_dir

__all__ = ["run_data_plane", "start_worker", "stats_dir", "stop_data_plane", "wait_ready"]

_START_TIMEOUT_S = 60.0


def stats_dir(settings: NodeSettings) -> Path:
    """Where the workers of a node's data plane keep their counters."""
    return settings.data_dir / "data-plane"


def run_data_plane(
    settings: NodeSettings,
    *,
    port: int,
    workers: int,
    tokens: bytes | None = None,
    log_format: str | None = None,
) -> list[subprocess.Popen[bytes]]:
    """Start ``workers`` processes serving on ``settings.host:port``; return once all listen.

    Each is ``python -m api.data_plane --worker ...`` (a fresh interpreter: nothing of
    the caller's threads, event loop or main module comes along), with its own stats slot,
    zeroed here; ``tokens`` and ``log_format`` go to each (see :func:`start_worker`). Raises
    RuntimeError, after stopping the others, when a worker cannot start (say the port belongs
    to something else). Nothing restarts a worker that dies: see
    :class:`api.data_plane_supervisor.DataPlane` for that.
    """
    if workers < 1 or not 0 < port < 65536:
        raise ValueError("the data plane needs a port and at least one worker")
    _check_port_free(settings.host, port)
    reset_stats_dir(stats_dir(settings), workers)
    processes = [
        start_worker(settings, port=port, slot=slot, tokens=tokens, log_format=log_format)
        for slot in range(workers)
    ]
    deadline = time.monotonic() + _START_TIMEOUT_S
    try:
        for process in processes:
            wait_ready(process, deadline=deadline)
    except BaseException:
        stop_data_plane(processes)
        raise
    return processes


def start_worker(
    settings: NodeSettings,
    *,
    port: int,
    slot: int,
    tokens: bytes | None = None,
    log_format: str | None = None,
) -> subprocess.Popen[bytes]:
    """Spawn one worker process for stats slot ``slot``; :func:`wait_ready` waits for it.

    ``tokens``, the bytes of the last tokens file the node accepted, reach the worker on its
    standard input (an in-memory file, so no write blocks and no copy lands on a disk); it
    starts from them only if the file on disk cannot be used. ``log_format`` (text, json)
    makes the worker log its events as ``serve`` does; without it, only its errors show.
    """
    command = [
        sys.executable, "-m", "api.data_plane", "--worker",
        "--data-dir", str(settings.data_dir),
        "--host", settings.host,
        "--port", str(port),
        "--capacity", str(settings.capacity),
        "--slot", str(slot),
        "--tokens-check-interval", str(settings.tokens_check_interval_s),
    ]
    if log_format is not None:
        command += ["--log-format", log_format]
    # The region secret (peers read blobs from the data plane too) goes in the worker's own
    # environment, where settings read it, never on its command line.
    env = None
    if settings.regional.secret is not None:
        env = {**os.environ,
               "WEIGHTCACHE_REGION_SECRET": settings.regional.secret.get_secret_value()}
    if settings.tokens_file is None:
        return subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    command += ["--tokens", str(settings.tokens_file)]
    if tokens is None:
        return subprocess.Popen(command, stdout=subprocess.PIPE, env=env)
    with _in_memory_file(tokens) as stdin:
        return subprocess.Popen(
            [*command, "--tokens-fallback-stdin"], stdin=stdin, stdout=subprocess.PIPE, env=env
        )


def _in_memory_file(data: bytes) -> IO[bytes]:
    """A readable file holding ``data``, positioned at its start, that lives only in memory."""
    handle = os.fdopen(os.memfd_create("weightcache-tokens", os.MFD_CLOEXEC), "w+b")
    handle.write(data)
    handle.flush()
    handle.seek(0)
    return handle


def wait_ready(process: subprocess.Popen[bytes], *, deadline: float) -> None:
    """Wait for a worker's "ready" line; RuntimeError with its reason when it does not come."""
    assert process.stdout is not None
    with process.stdout:  # the worker writes one line: "ready", or why it is not
        readable, _, _ = select.select([process.stdout], [], [], _remaining(deadline))
        line = process.stdout.readline().decode().strip() if readable else "timed out"
    if line != "ready":
        raise RuntimeError(f"data plane worker did not start: {line or 'it exited'}")


def _check_port_free(host: str, port: int) -> None:
    """Refuse a port something listens on: workers of another data plane (say another node's,
    on the same port by mistake) would otherwise join the SO_REUSEPORT group and share it."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the workers do
        try:
            probe.bind(address)
        except OSError as exc:
            raise RuntimeError(f"cannot serve the data plane on {host}:{port}: {exc}") from None


def stop_data_plane(
    processes: list[subprocess.Popen[bytes]], *, timeout_s: float = 10.0
) -> None:
    """Ask every worker to finish (SIGTERM), then kill the ones still running."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    deadline = time.monotonic() + timeout_s
    for process in processes:
        try:
            process.wait(_remaining(deadline))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - time.monotonic())
