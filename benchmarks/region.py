"""A region's aggregate throughput to N concurrent replicas: one cache node against three.

One command (a few minutes at most on 2 cores)::

    .venv/bin/python benchmarks/region.py [--replicas 8] [--size-mib 512] [--repeat 3]

What it does, in one run:

1. Writes a model (four safetensors files of random bytes, ``--size-mib`` in all, with a
   ``SHA256SUMS`` digest manifest), starts a fresh SeaweedFS on loopback and uploads it.
2. Puts a counting proxy (``tests/fixtures/counting_proxy.py``) in front of SeaweedFS: every
   byte an origin object sends to a cache node is counted.
3. Starts three cache nodes (``weightcache serve``, each with ``--data-workers`` sendfile
   workers) whose S3 origin is the proxy, and warms the pipeline. When ``serve`` knows
   ``--advertise`` (the region is wired into the node), the nodes run as one region on a real
   ``redis-server`` and the pipeline is registered on one node only; otherwise they are three
   independent nodes, each registered and filled on its own (the origin then sends every byte
   three times), and the manifests are given the three nodes' data planes as each blob's
   holders (``tests/fixtures/region_manifests.py``), so the loader's side of a region is what
   is measured.
4. Starts ``--replicas`` replica processes (each imports torch once, then waits), and times
   rounds in which all of them load the whole pipeline into the CPU at the same moment
   (``loader.load``: lease, manifest, range requests, one flat allocation), from one node
   (every blob's holders: node 1 alone) and from three (all three nodes), alternating, after
   one untimed round of each (the data planes check each chunk's digest on its first read).

Aggregate GB/s is every replica's delivered bytes over the wall time from the first replica's
start to the last one's end (10^9 bytes per second). Bytes per node come from the replicas'
load reports and, independently, from each node's ``weightcache_data_plane_bytes_served_total``.
On a small machine the nodes and the replicas share the same cores, so three nodes cannot show
what three hosts' NICs and disks would add: read the spread over the nodes and the origin bytes
first, the GB/s second. Results go to ``benchmarks/results/region-cpu-<N>core.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BUCKET = "bench"
PREFIX = "org/model"
PIPELINE = "bench"
FILES = 4
SECRET = "benchmark-region-secret-0123456789abcdef"
_BLOCK = 64 << 20


# --------------------------------------------------------------------------- the replicas


def replica_main() -> int:
    """A replica process: one JSON command a line on stdin, one JSON result a line out.

    A command ``{"url", "nodes" (or null: the manifest as the node sends it), "start_at"}`` is
    a load of the pipeline from the node at ``url``, begun at wall-clock time ``start_at``.
    """
    import torch  # noqa: F401  (imported before the first command: not part of any timing)

    from loader.loading import load
    from tests.fixtures.region_manifests import RegionManifests

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        transport: httpx.BaseTransport = (
            RegionManifests(command["nodes"]) if command["nodes"] is not None
            else httpx.HTTPTransport()
        )
        with httpx.Client(transport=transport, timeout=60) as http:
            delay = command["start_at"] - time.time()
            if delay > 0:
                time.sleep(delay)
            started, cpu_started = time.time(), time.process_time()
            result = load(PIPELINE, url=command["url"], http=http, device="cpu",
                          workers=command["workers"], request_size=command["request_size"])
            ended, cpu = time.time(), time.process_time() - cpu_started
        report = result.report
        del result
        print(json.dumps({
            "started": started,
            "ended": ended,
            "bytes": report.bytes,
            "gb_per_s": report.gb_per_s,
            "bytes_by_node": report.bytes_by_node,
            "failed_nodes": report.failed_nodes,
            "lease_s": report.lease_s,
            "manifest_s": report.manifest_s,
            "cpu_s": cpu,
        }), flush=True)
    return 0


@dataclass
class Replica:
    process: subprocess.Popen[str]

    @property
    def stdin(self) -> IO[str]:
        assert self.process.stdin is not None
        return self.process.stdin

    def answer(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"replica {self.process.pid} exited ({self.process.poll()})")
        answer: dict[str, Any] = json.loads(line)
        return answer


@contextlib.contextmanager
def replicas(count: int) -> Iterator[list[Replica]]:
    started = [
        Replica(subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--replica"], cwd=ROOT,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        ))
        for _ in range(count)
    ]
    try:
        for replica in started:
            replica.answer()  # ready: torch imported
        yield started
    finally:
        for replica in started:
            if replica.process.stdin is not None:
                replica.process.stdin.close()
        for replica in started:
            try:
                replica.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                replica.process.kill()
                replica.process.wait()


def load_round(
    fleet: list[Replica], *, url: str, nodes: list[str] | None, args: argparse.Namespace
) -> dict[str, Any]:
    """Every replica loads the pipeline at once; the round's aggregate figures."""
    command = json.dumps({
        "url": url, "nodes": nodes, "start_at": time.time() + 0.5,
        "workers": args.workers, "request_size": args.request_mib << 20,
    })
    for replica in fleet:
        replica.stdin.write(command + "\n")
        replica.stdin.flush()
    answers = [replica.answer() for replica in fleet]
    wall = max(a["ended"] for a in answers) - min(a["started"] for a in answers)
    total = sum(a["bytes"] for a in answers)
    by_node: dict[str, int] = {}
    for answer in answers:
        for node, count in answer["bytes_by_node"].items():
            by_node[node] = by_node.get(node, 0) + count
    return {
        "aggregate_gb_per_s": total / wall / 1e9,
        "wall_s": wall,
        "bytes": total,
        "replica_gb_per_s": [a["gb_per_s"] for a in answers],
        "lease_s": [a["lease_s"] for a in answers],
        "manifest_s": [a["manifest_s"] for a in answers],
        "replica_cpu_s": sum(a["cpu_s"] for a in answers),
        "bytes_by_node": by_node,
        "failed_nodes": sorted({n for a in answers for n in a["failed_nodes"]}),
    }


# ------------------------------------------------------------------------ origin and nodes


def write_model(folder: Path, total_bytes: int) -> dict[str, int]:
    """``FILES`` safetensors files of random bytes (one U8 tensor each) and ``SHA256SUMS``."""
    folder.mkdir(parents=True, exist_ok=True)
    sizes: dict[str, int] = {}
    lines = []
    for index in range(FILES):
        name = f"model-{index + 1:05d}-of-{FILES:05d}.safetensors"
        payload = total_bytes // FILES
        header = json.dumps(
            {"weight": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}}
        ).encode()
        header += b" " * (-len(header) % 8)
        digest = hashlib.sha256()
        with (folder / name).open("wb") as out:
            for block in [struct.pack("<Q", len(header)) + header,
                          *(os.urandom(min(_BLOCK, payload - at))
                            for at in range(0, payload, _BLOCK))]:
                out.write(block)
                digest.update(block)
        sizes[name] = (folder / name).stat().st_size
        lines.append(f"{digest.hexdigest()}  {name}\n")
    (folder / "SHA256SUMS").write_text("".join(lines))
    (folder / "config.json").write_text('{"model_type": "unknown-arch"}')
    return sizes


def free_port() -> int:
    from clients.seaweed import free_ports

    (port,) = free_ports(1)
    return port


@dataclass
class Node:
    process: subprocess.Popen[bytes]
    url: str
    data_url: str


def region_supported() -> bool:
    """Whether ``weightcache serve`` takes ``--advertise``: the node runs a region."""
    helped = subprocess.run(
        [sys.executable, "-m", "clients.cli", "serve", "--help"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return "--advertise" in helped.stdout


@contextlib.contextmanager
def cache_nodes(
    root: Path, *, origin: str, access_key: str, secret_key: str, workers: int,
    redis_url: str | None,
) -> Iterator[list[Node]]:
    nodes: list[Node] = []
    try:
        for index in range(3):
            port, data_port = free_port(), free_port()
            url = f"http://127.0.0.1:{port}"
            command = [
                sys.executable, "-m", "clients.cli", "serve",
                "--data-dir", str(root / f"node-{index + 1}"), "--port", str(port),
                "--data-port", str(data_port), "--data-workers", str(workers),
                "--capacity", "16GiB", "--region", "bench", "--log-format", "json",
            ]
            if redis_url is not None:
                command += ["--redis", redis_url, "--advertise", url]
            env = {
                **os.environ,
                "WEIGHTCACHE_NODE_ID": f"bench-node-{index + 1}",
                "WEIGHTCACHE_REGION_SECRET": SECRET,
                "WEIGHTCACHE_S3_ENDPOINT_URL": origin,
                "WEIGHTCACHE_S3_ACCESS_KEY_ID": access_key,
                "WEIGHTCACHE_S3_SECRET_ACCESS_KEY": secret_key,
                "WEIGHTCACHE_S3_REGION": "us-east-1",
            }
            log = (root / f"node-{index + 1}.log").open("wb")
            with log:
                process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=log)
            nodes.append(Node(process, url, f"http://127.0.0.1:{data_port}"))
        for node in nodes:
            wait_until(lambda n=node: _healthy(n), what=f"{node.url} healthy", timeout_s=60)
        yield nodes
    finally:
        for node in nodes:
            node.process.terminate()
        for node in nodes:
            try:
                node.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()


def _healthy(node: Node) -> bool:
    if node.process.poll() is not None:
        raise RuntimeError(f"the node at {node.url} exited")
    try:
        return httpx.get(f"{node.url}/healthz", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def wait_until(condition: Any, *, what: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)


def state_of(node: Node) -> str:
    answer = httpx.get(f"{node.url}/v1/pipelines/{PIPELINE}", timeout=10)
    if answer.status_code == 404:
        return "unknown"
    state = str(answer.json()["state"])
    if state == "failed":
        raise RuntimeError(f"{node.url}: {answer.text}")
    return state


def warm(nodes: list[Node], *, region: bool) -> float:
    """Register the pipeline (on node 1 in a region, on every node otherwise) and wait until
    every node has it warm; seconds taken."""
    body = {"models": [{"name": "m", "source": f"s3://{BUCKET}/{PREFIX}"}]}
    started = time.perf_counter()
    for node in nodes[:1] if region else nodes:
        httpx.put(f"{node.url}/v1/pipelines/{PIPELINE}", json=body, timeout=30).raise_for_status()
    for node in nodes:
        wait_until(lambda n=node: state_of(n) == "warm", what=f"{node.url} warm",
                   timeout_s=600)
    return time.perf_counter() - started


def node_cpu_seconds(nodes: list[Node]) -> float:
    """User + system CPU seconds of the nodes' processes so far: each API process and its
    data-plane workers (Linux ``/proc``)."""
    pids = []
    for node in nodes:
        pids.append(node.process.pid)
        for task in Path(f"/proc/{node.process.pid}/task").iterdir():
            pids += [int(pid) for pid in (task / "children").read_text().split()]
    total = 0
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


_SERVED = re.compile(r"^weightcache_data_plane_bytes_served_total (\S+)$", re.M)


def served_bytes(node: Node) -> int:
    """The node's data-plane bytes served so far (its own count)."""
    found = _SERVED.search(httpx.get(f"{node.url}/metrics", timeout=10).text)
    return int(float(found.group(1))) if found else 0


# ---------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> dict[str, Any]:
    from clients.seaweed import SeaweedServer
    from tests.fixtures.counting_proxy import CountingProxy

    region = region_supported() and not args.independent
    args.load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="wc-region-",
                                                                    dir=args.dir)))
        print("writing the model", file=sys.stderr)
        sizes = write_model(root / "model", args.size_mib << 20)
        seaweed = stack.enter_context(SeaweedServer(root / "seaweed"))
        seaweed.create_bucket(BUCKET)
        for name in [*sizes, "SHA256SUMS", "config.json"]:
            seaweed.put_file(BUCKET, f"{PREFIX}/{name}", root / "model" / name)
        proxy = stack.enter_context(CountingProxy(seaweed.endpoint_url))
        redis_url = None
        if region:
            from tests.fixtures.redis_server import RedisServer

            redis = RedisServer(root / "redis")
            redis.start()
            stack.callback(redis.stop)
            redis_url = redis.url
        nodes = stack.enter_context(cache_nodes(
            root, origin=proxy.endpoint_url, access_key=seaweed.access_key,
            secret_key=seaweed.secret_key, workers=args.data_workers, redis_url=redis_url,
        ))
        print(f"warming ({'one region' if region else 'three independent nodes'})",
              file=sys.stderr)
        warm_s = warm(nodes, region=region)
        model_bytes = sum(sizes.values())
        origin = {
            "bytes_sent": proxy.bytes_sent(),
            "model_bytes": model_bytes,
            "times_the_model": round(proxy.bytes_sent() / model_bytes, 3),
            "per_file": {name: proxy.bytes_sent(f"/{BUCKET}/{PREFIX}/{name}")
                         for name in sizes},
            "warm_s": round(warm_s, 3),
        }
        print(json.dumps(origin), file=sys.stderr)

        one = [nodes[0].data_url]
        three = None if region else [node.data_url for node in nodes]
        legs: dict[str, list[dict[str, Any]]] = {"one_node": [], "three_nodes": []}
        with replicas(args.replicas) as fleet:
            for round_index in range(args.repeat + 1):
                order = [("one_node", one), ("three_nodes", three)]
                for leg, holders in order if round_index % 2 == 0 else order[::-1]:
                    before = {node.data_url: served_bytes(node) for node in nodes}
                    cpu_before = node_cpu_seconds(nodes)
                    result = load_round(fleet, url=nodes[0].url, nodes=holders, args=args)
                    result["node_cpu_s"] = node_cpu_seconds(nodes) - cpu_before
                    result["server_bytes_by_node"] = {
                        node.data_url: served_bytes(node) - before[node.data_url]
                        for node in nodes
                    }
                    if round_index == 0:
                        continue  # untimed: the data planes' first reads check every chunk
                    legs[leg].append(result)
                    print(leg, round(result["aggregate_gb_per_s"], 3), file=sys.stderr)
        return report(args, region=region, origin=origin, legs=legs, nodes=nodes)


def report(
    args: argparse.Namespace, *, region: bool, origin: dict[str, Any],
    legs: dict[str, list[dict[str, Any]]], nodes: list[Node],
) -> dict[str, Any]:
    names = {node.data_url: f"node-{index + 1}" for index, node in enumerate(nodes)}

    def summary(rounds: list[dict[str, Any]]) -> dict[str, Any]:
        total = sum(r["bytes"] for r in rounds)
        served: dict[str, int] = {}
        server: dict[str, int] = {}
        for r in rounds:
            for url, count in r["bytes_by_node"].items():
                served[names.get(url, url)] = served.get(names.get(url, url), 0) + count
            for url, count in r["server_bytes_by_node"].items():
                server[names[url]] = server.get(names[url], 0) + count
        return {
            "aggregate_gb_per_s_median": round(
                statistics.median(r["aggregate_gb_per_s"] for r in rounds), 3),
            "aggregate_gb_per_s_runs": [round(r["aggregate_gb_per_s"], 3) for r in rounds],
            "wall_s_median": round(statistics.median(r["wall_s"] for r in rounds), 3),
            "replica_gb_per_s_median": round(
                statistics.median(g for r in rounds for g in r["replica_gb_per_s"]), 3),
            # What the API answers cost a replica while the others stream (medians, seconds).
            "lease_s_median": round(statistics.median(x for r in rounds for x in r["lease_s"]), 4),
            "manifest_s_median": round(
                statistics.median(x for r in rounds for x in r["manifest_s"]), 4),
            "share_by_node": {name: round(count / total, 3) for name, count in served.items()},
            "server_share_by_node": {
                name: round(count / total, 3) for name, count in sorted(server.items())},
            "failed_nodes": sorted({n for r in rounds for n in r["failed_nodes"]}),
            # CPU the nodes spent per GB served (API processes and data-plane workers): with
            # what a host's cores allow, the ceiling of one node's serving rate.
            "node_cpu_s_per_gb": round(sum(r["node_cpu_s"] for r in rounds) / (total / 1e9), 3),
            # ... and the replicas per GB loaded (reading sockets into fresh CPU tensors): on a
            # small machine, where the two compete for the same cores, the larger share.
            "replica_cpu_s_per_gb": round(
                sum(r["replica_cpu_s"] for r in rounds) / (total / 1e9), 3),
        }

    one, three = summary(legs["one_node"]), summary(legs["three_nodes"])
    cpus = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return {
        "benchmark": "region",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "description": f"{cpus}-core CPU, no GPU; nodes, replicas and the origin on "
                           "loopback on this one machine",
            "cpus": cpus,
            "memory_gib": round(memory / 2**30, 1),
            "platform": platform.platform(),
            "python": platform.python_version(),
            # The machine is shared: other work's load (1, 5, 15 min) before the run and after.
            "load_average_before": [round(x, 2) for x in args.load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "mode": "region" if region else "independent nodes",
        "mode_why": (
            "serve takes --advertise: three nodes of one region on a real redis-server, the "
            "pipeline registered on node 1 only, the manifests' holders as the region names them"
            if region else
            "serve has no --advertise yet: three independent nodes, each registered and filled "
            "from the origin on its own; the manifests are given the three data planes as every "
            "blob's holders, as a region node will give them"
        ),
        "settings": {
            "replicas": args.replicas,
            "repeat": args.repeat,
            "model_bytes": origin["model_bytes"],
            "files": FILES,
            "request_mib": args.request_mib,
            "reader_threads_per_replica": args.workers,
            "data_workers_per_node": args.data_workers,
            "device": "cpu",
            "page_cache": "warm",
        },
        "origin": origin,
        "one_node": one,
        "three_nodes": three,
        "three_over_one": round(
            three["aggregate_gb_per_s_median"] / one["aggregate_gb_per_s_median"], 3),
    }


def main() -> int:
    if "--replica" in sys.argv[1:]:
        return replica_main()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, default=8)
    parser.add_argument("--size-mib", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--request-mib", type=int, default=16)
    parser.add_argument("--workers", type=int, default=4, help="reader threads per replica")
    parser.add_argument("--data-workers", type=int, default=2, help="data plane workers a node")
    parser.add_argument("--independent", action="store_true",
                        help="three independent nodes even when serve runs a region")
    parser.add_argument("--dir", type=Path, default=None, help="where to put files (a tmp dir)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = run(args)
    out = args.out or RESULTS / f"region-cpu-{os.cpu_count()}core.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
