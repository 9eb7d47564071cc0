"""Blob serving throughput to one replica: the FastAPI route against the sendfile data plane.

One command (here: 2 cores, loopback; on the 16-core GPU host add ``--workers 1,4,8,16
--connections 32``)::

    .venv/bin/python benchmarks/data_plane.py

It writes ``--size-gb`` of random safetensors files (four of them), starts a real node
(``weightcache serve --data-workers 0``, one uvicorn process), warms a pipeline from them, and
then reads every blob once per run, in ``--request-mb`` ranges over ``--connections`` keep-alive
connections, with the loader's ``HttpRangeSource`` into one reused, pre-touched buffer (the
replica's CPU sink without its allocation), from:

- ``fastapi``: the node's own ``GET /v1/blobs/{sha256}`` (Python bytes through uvicorn);
- ``data_plane-wN``: ``api.data_plane`` with N worker processes (sendfile, SO_REUSEPORT).

Page cache warm (the files were just written and are read once before timing). Each server's
first pass is timed on its own (it hashes every 64 MiB chunk once per process to verify it),
then ``--repeat`` passes, with the server processes' CPU seconds per GB (on a 2-core box the
replica and the server share the cores, so that figure says more than GB/s about what more
cores buy). Results, with medians, go to
``benchmarks/results/data_plane-cpu<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.data_plane import run_data_plane, stop_data_plane
from cache_node.settings import NodeSettings
from loader.sources import HttpRangeSource

ROOT = Path(__file__).resolve().parents[1]
FILES = 4


def write_source(directory: Path, total_bytes: int) -> None:
    """``FILES`` safetensors files of random bytes, ``total_bytes`` in all."""
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)
    per_file = total_bytes // FILES
    for index in range(FILES):
        data = torch.randint(0, 256, (per_file,), dtype=torch.uint8, generator=generator)
        save_file({f"blob.{index}": data}, str(directory / f"model-{index:05d}.safetensors"))
    (directory / "config.json").write_text("{}")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of processes so far (Linux ``/proc``)."""
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)
    return total / os.sysconf("SC_CLK_TCK")


@contextmanager
def running_node(data_dir: Path, source: Path) -> Iterator[tuple[str, int]]:
    """``weightcache serve`` with no data plane, in its own process; yields its URL and pid."""
    port = free_port()
    command = [
        sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(data_dir),
        "--port", str(port), "--local-root", str(source), "--capacity", "64GiB",
        "--data-workers", "0",
    ]
    process = subprocess.Popen(command, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/healthz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("the node did not start")
            time.sleep(0.1)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(30)


def warm(url: str, source: Path) -> dict[str, int]:
    """Register the source as pipeline ``bench``, wait until warm; its blobs and sizes."""
    with httpx.Client(base_url=url, timeout=60) as client:
        answer = client.put(
            "/v1/pipelines/bench",
            json={"models": [{"name": "m", "source": f"file://{source}"}]},
        )
        answer.raise_for_status()
        while (state := client.get("/v1/pipelines/bench").json()["state"]) != "warm":
            if state == "failed":
                raise RuntimeError(client.get("/v1/pipelines/bench").text)
            time.sleep(0.2)
        files = client.get("/v1/pipelines/bench/files").json()["files"]
    return {f["blob"]: f["size"] for f in files if f["path"].endswith(".safetensors")}


def read_all(
    base_url: str, blobs: dict[str, int], buffer: memoryview, *, connections: int, request: int
) -> float:
    """Read every blob into ``buffer`` with range requests; seconds taken."""
    jobs = []
    position = 0
    for blob, size in blobs.items():
        for offset in range(0, size, request):
            length = min(request, size - offset)
            jobs.append((blob, offset, buffer[position : position + length]))
            position += length
    source = HttpRangeSource([base_url], connections=connections)
    try:
        source.prepare(blobs)
        with ThreadPoolExecutor(connections) as pool:
            started = time.perf_counter()
            for future in [pool.submit(source.read_into, *job) for job in jobs]:
                future.result()
            return time.perf_counter() - started
    finally:
        source.close()


def measure(
    name: str,
    base_url: str,
    blobs: dict[str, int],
    buffer: memoryview,
    args: argparse.Namespace,
    *,
    server_pids: list[int],
) -> dict[str, Any]:
    total = sum(blobs.values())

    def once() -> float:
        seconds = read_all(
            base_url, blobs, buffer, connections=args.connections, request=args.request_mb << 20
        )
        return total / seconds / 1e9

    first = once()
    cpu_before = cpu_seconds(server_pids)
    runs = [once() for _ in range(args.repeat)]
    cpu_per_gb = (cpu_seconds(server_pids) - cpu_before) / (total * args.repeat / 1e9)
    result = {
        "server": name,
        "first_pass_gb_s": round(first, 3),
        "gb_s_median": round(statistics.median(runs), 3),
        "gb_s_runs": [round(r, 3) for r in runs],
        # Server CPU per GB served (after the first pass): what more cores can scale.
        "server_cpu_s_per_gb": round(cpu_per_gb, 3),
    }
    print(json.dumps(result), file=sys.stderr)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-gb", type=float, default=2.0)
    parser.add_argument("--workers", default=None,
                        help="data plane process counts, e.g. 1,4,8,16 (default: 1,2 and cores)")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--request-mb", type=int, default=16)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-fastapi", action="store_true", help="skip the slow FastAPI route")
    parser.add_argument("--dir", type=Path, default=None, help="where to put files (a tmp dir)")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    counts = (
        [int(n) for n in args.workers.split(",")]
        if args.workers
        else sorted({1, 2, cores})
    )

    with tempfile.TemporaryDirectory(dir=args.dir) as scratch:
        source, data_dir = Path(scratch) / "src", Path(scratch) / "data"
        write_source(source, int(args.size_gb * 1e9))
        results = []
        with running_node(data_dir, source) as (url, node_pid):
            blobs = warm(url, source)
            buffer = memoryview(bytearray(sum(blobs.values())))  # zero-filled: pages touched
            if not args.no_fastapi:
                results.append(
                    measure("fastapi", url, blobs, buffer, args, server_pids=[node_pid])
                )
            for workers in counts:
                port = free_port()
                settings = NodeSettings(data_dir=data_dir, host="127.0.0.1")
                processes = run_data_plane(settings, port=port, workers=workers)
                try:
                    name = f"data_plane-w{workers}"
                    entry = measure(
                        name, f"http://127.0.0.1:{port}", blobs, buffer, args,
                        server_pids=[p.pid for p in processes],
                    )
                    results.append({**entry, "workers": workers})
                finally:
                    stop_data_plane(processes)

    machine = f"cpu{cores}"
    report = {
        "benchmark": "data_plane",
        "machine": machine,
        "cpus": cores,
        "python": platform.python_version(),
        "bytes": sum(blobs.values()),
        "blobs": len(blobs),
        "connections": args.connections,
        "request_bytes": args.request_mb << 20,
        "repeat": args.repeat,
        "page_cache": "warm",
        "transport": "loopback TCP, one replica process (HttpRangeSource threads)",
        "results": results,
    }
    out = ROOT / "benchmarks" / "results" / f"data_plane-{machine}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
