"""Soak: a real node under registrations, loads, evictions, origin faults, kill -9 and a full disk.

One ``weightcache serve`` process (API plus data-plane workers) runs on a data dir of its own, on a
small tmpfs where the test can mount one, with SeaweedFS behind the counting, fault-injecting proxy
as its origin. A seeded random driver then, for the run's duration:

* registers pipelines (one or two of six tiny Llamas, TP 1 or 1+2, sometimes pinned), warms,
  evicts and deletes them; the capacity holds about half the models, so eviction is constant;
* loads a random rank of a warm pipeline with ``verify=True`` (every byte checked against the
  manifest digests) and, at TP 1, compares every tensor with the checkpoint it came from;
* injects origin faults (503s, connection resets mid-body, slow bodies);
* flips a byte of a committed blob now and then (the node must catch it, never serve it);
* fills the filesystem under the data dir for a few seconds (when it is a tmpfs of the test's);
* kills the node with SIGKILL every ``kill_every_s`` and starts it again on the same data dir.

It counts integrity violations (a load that returned a wrong byte), server errors (5xx other than
507 and 503), pipelines stuck ``warming`` once the faults stop, accounting drift (``used`` against
the bytes under ``blobs/``), and samples the node's RSS and open file descriptors. The figures go
to ``test-artifacts/soak-<name>.json``.

``make test`` runs a one-minute version; ``make test-all`` runs ``WEIGHTCACHE_SOAK_S`` seconds
(30 minutes by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import load_file

from api.embedded import free_port
from clients.errors import ClientError
from clients.seaweed import SeaweedServer
from loader.errors import IntegrityError as LoaderIntegrityError
from loader.loading import load
from loader.manifest_stream import tensor_keys
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.tiny_llama import make_tiny_llama

MiB = 1024 * 1024
ARTIFACTS = Path(__file__).parents[1] / "test-artifacts"

# (layers, hidden, intermediate): six checkpoints of about 0.5 to 6 MiB
_SHAPES = [(2, 64, 128), (2, 128, 256), (3, 128, 384), (2, 192, 512), (4, 192, 512), (3, 256, 768)]


@dataclass
class Figures:
    """What the soak saw; written as JSON at the end."""

    name: str
    duration_s: float
    seed: int
    steps: int = 0
    ops: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)
    kills: int = 0
    faults_injected: int = 0
    flips: int = 0
    disk_fills: int = 0
    disk_fill_mode: str = "none"
    loads_verified: int = 0
    load_errors: Counter[str] = field(default_factory=Counter)
    bytes_verified: int = 0
    integrity_violations: list[str] = field(default_factory=list)
    server_errors: list[str] = field(default_factory=list)
    stuck_warming: list[str] = field(default_factory=list)
    accounting: list[dict[str, int]] = field(default_factory=list)
    rss_mib: list[float] = field(default_factory=list)
    fds: list[int] = field(default_factory=list)
    final_phase_rss_mib: list[float] = field(default_factory=list)
    final_phase_fds: list[int] = field(default_factory=list)

    def write(self) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"soak-{self.name}.json"
        data = {k: (dict(v) if isinstance(v, Counter) else v) for k, v in vars(self).items()}
        path.write_text(json.dumps(data, indent=1))
        return path


class NodeProcess:
    """``python -m clients.cli serve`` on a data dir; started, killed and restarted by the soak."""

    def __init__(self, data_dir: Path, *, capacity: int, proxy: CountingProxy,
                 seaweed: SeaweedServer, log: Path) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.data_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.capacity = capacity
        self.env = {
            **os.environ,
            "WEIGHTCACHE_S3_ENDPOINT_URL": proxy.endpoint_url,
            "WEIGHTCACHE_S3_ACCESS_KEY_ID": seaweed.access_key,
            "WEIGHTCACHE_S3_SECRET_ACCESS_KEY": seaweed.secret_key,
            "WEIGHTCACHE_FETCH_PART_SIZE": "1MiB",
            "WEIGHTCACHE_FETCH_CONCURRENCY": "2",
            "WEIGHTCACHE_FETCH_MAX_ATTEMPTS": "3",
            "WEIGHTCACHE_FETCH_BACKOFF_BASE_S": "0.05",
            "WEIGHTCACHE_FETCH_BACKOFF_CAP_S": "0.5",
            "WEIGHTCACHE_FETCH_STALL_TIMEOUT_S": "5",
            "WEIGHTCACHE_FETCH_NEGATIVE_CACHE_S": "0",
        }
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [sys.executable, "-m", "clients.cli", "serve", "--data-dir", str(self.data_dir),
                   "--port", str(self.port), "--data-port", str(self.data_port),
                   "--capacity", str(self.capacity),
                   "--data-workers", "2", "--log-format", "json"]
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(command, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            if self.process.poll() is not None:
                break
            time.sleep(0.1)
        raise RuntimeError(f"node did not start; see {self.log}")

    def kill9(self) -> None:
        assert self.process is not None
        # The data-plane workers are children: kill -9 the whole node, as an OOM kill would.
        with contextlib.suppress(ProcessLookupError):
            for child in _children(self.process.pid):
                os.kill(child, signal.SIGKILL)
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill9()

    def sample(self) -> tuple[float, int]:
        """(RSS in MiB, open file descriptors) of the node's main process."""
        assert self.process is not None
        pid = self.process.pid
        rss_kib = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss_kib = int(line.split()[1])
        return rss_kib / 1024, len(os.listdir(f"/proc/{pid}/fd"))


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@contextlib.contextmanager
def small_filesystem(path: Path, size: int) -> Iterator[bool]:
    """A tmpfs of ``size`` bytes at ``path`` when this process may mount one; yields whether."""
    path.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True, check=False,
    ).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


class Soak:
    """The random driver; one instance per run."""

    def __init__(self, figures: Figures, node: NodeProcess, proxy: CountingProxy,
                 seaweed: SeaweedServer, models: dict[str, Path], bucket: str,
                 fill_dir: Path | None) -> None:
        self.figures = figures
        self.node = node
        self.proxy = proxy
        self.seaweed = seaweed
        self.models = models
        self.bucket = bucket
        self.fill_dir = fill_dir
        self.rng = random.Random(figures.seed)
        self.pipelines = [f"p{i}" for i in range(8)]
        self.http = httpx.Client(base_url=node.url, timeout=30)
        self.reference: dict[str, dict[str, torch.Tensor]] = {
            name: load_file(str(directory / "model.safetensors"))
            for name, directory in models.items()
        }
        self.specs: dict[str, list[str]] = {}

    # ------------------------------------------------------------------ operations
    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response | None:
        try:
            answer = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            self.figures.answers[f"{method} transport:{type(exc).__name__}"] += 1
            return None
        self.figures.answers[f"{method} {answer.status_code}"] += 1
        if answer.status_code >= 500 and answer.status_code not in (503, 507):
            self.figures.server_errors.append(f"{method} {path}: {answer.status_code} "
                                              f"{answer.text[:200]}")
        return answer

    def register(self) -> None:
        pipeline = self.rng.choice(self.pipelines)
        names = self.rng.sample(sorted(self.models), self.rng.choice((1, 1, 2)))
        body = {
            "models": [{"name": n, "source": f"s3://{self.bucket}/{n}"} for n in names],
            "tp_sizes": self.rng.choice(([1], [1], [1, 2])),
            "pinned": self.rng.random() < 0.1,
        }
        answer = self.call("PUT", f"/v1/pipelines/{pipeline}", json=body)
        if answer is not None and answer.status_code in (200, 202):
            self.specs[pipeline] = names

    def simple(self, method: str, suffix: str) -> None:
        pipeline = self.rng.choice(self.pipelines)
        self.call(method, f"/v1/pipelines/{pipeline}{suffix}")

    def load_one(self) -> None:
        answer = self.call("GET", "/v1/pipelines")
        if answer is None or answer.status_code != 200:
            return
        warm = [p for p in answer.json()["pipelines"] if p["state"] == "warm"]
        if not warm:
            return
        status = self.rng.choice(warm)
        tp_size = self.rng.choice(status["tp_sizes"])
        rank = self.rng.randrange(tp_size)
        self.verify_load(status["id"], tp_size, rank, [m["name"] for m in status["models"]])

    def verify_load(self, pipeline: str, tp_size: int, rank: int, names: list[str]) -> None:
        try:
            result = load(pipeline, tp_size=tp_size, rank=rank, url=self.node.url, verify=True)
        except LoaderIntegrityError as exc:
            # verify=True failed: the node served a byte that is not the manifest's
            self.figures.integrity_violations.append(f"{pipeline} tp{tp_size}/{rank}: {exc}")
            return
        except (ClientError, httpx.HTTPError, OSError) as exc:
            # evicted, deleted or quarantined under the load, or the node was killed: a clean
            # refusal, never wrong bytes
            self.figures.load_errors[type(exc).__name__] += 1
            return
        self.figures.loads_verified += 1
        self.figures.bytes_verified += result.report.bytes
        if tp_size != 1:
            return
        # which model each tensor is from, as the manifest says (the pipeline may have been
        # registered again between the status read and the load: its new spec is what loads)
        keys = tensor_keys(result.manifest)
        models = {key: t.model for key, t in zip(keys, result.manifest.tensors, strict=True)}
        for key, tensor in result.tensors.items():
            name = key.rpartition("/")[2]
            expected = self.reference[models[key]].get(name)
            if expected is None or not torch.equal(expected, tensor):
                self.figures.integrity_violations.append(
                    f"{pipeline} tp1: {key} differs from the checkpoint")

    def inject_fault(self) -> None:
        name = self.rng.choice(sorted(self.models))
        kind = self.rng.choice(("503", "reset", "slow"))
        fault = {
            "503": Fault(match=f"/{name}/model.safetensors", status=503, times=2),
            "reset": Fault(match=f"/{name}/model.safetensors", reset_after=64 * 1024, times=1),
            "slow": Fault(match=f"/{name}/model.safetensors", delay_s=0.5, times=3),
        }[kind]
        self.proxy.add_fault(fault)
        self.figures.faults_injected += 1

    def flip_byte(self) -> None:
        blobs = [p for p in (self.node.data_dir / "blobs").glob("*/*") if p.is_file()]
        if not blobs:
            return
        blob = self.rng.choice(blobs)
        with contextlib.suppress(OSError):
            size = blob.stat().st_size
            if size == 0:
                return
            with open(blob, "r+b") as handle:
                at = self.rng.randrange(size)
                handle.seek(at)
                byte = handle.read(1)
                handle.seek(at)
                handle.write(bytes([byte[0] ^ 0xFF]))
            self.figures.flips += 1

    def fill_disk(self, hold_s: float) -> None:
        """Take nearly all free space on the data dir's filesystem for ``hold_s`` seconds."""
        if self.fill_dir is None:
            return
        filler = self.fill_dir / f"filler-{uuid.uuid4().hex[:8]}"
        stat = os.statvfs(self.fill_dir)
        free = stat.f_bavail * stat.f_frsize
        try:
            with open(filler, "wb") as handle, contextlib.suppress(OSError):  # ENOSPC: the point
                handle.write(b"\0" * max(0, free - 256 * 1024))
            self.figures.disk_fills += 1
            self.drive_for(hold_s, allow_fill=False)
        finally:
            filler.unlink(missing_ok=True)

    def restart(self) -> None:
        self.node.kill9()
        self.figures.kills += 1
        self.node.start()

    def sample(self, *, final: bool = False) -> None:
        with contextlib.suppress(OSError):
            rss, fds = self.node.sample()
            (self.figures.final_phase_rss_mib if final else self.figures.rss_mib).append(rss)
            (self.figures.final_phase_fds if final else self.figures.fds).append(fds)

    # ------------------------------------------------------------------ driving
    def step(self, *, allow_fill: bool = True) -> None:
        ops = {
            "register": 5, "load": 6, "evict": 1, "delete": 1, "warm": 2, "status": 2,
            "fault": 1, "flip": 0.3, "fill": 0.2 if allow_fill else 0.0,
        }
        for disabled in os.environ.get("WEIGHTCACHE_SOAK_SKIP", "").split(","):
            ops.pop(disabled.strip(), None)  # to find which operation a failure needs
        op = self.rng.choices(list(ops), weights=list(ops.values()))[0]
        self.figures.ops[op] += 1
        self.figures.steps += 1
        if op == "register":
            self.register()
        elif op == "load":
            self.load_one()
        elif op == "evict":
            self.simple("POST", "/evict")
        elif op == "delete":
            self.simple("DELETE", "")
        elif op == "warm":
            self.simple("POST", "/warm")
        elif op == "status":
            self.call("GET", "/v1/pipelines")
            self.call("GET", "/v1/node")
        elif op == "fault":
            self.inject_fault()
        elif op == "flip":
            self.flip_byte()
        elif op == "fill":
            self.fill_disk(hold_s=3.0)

    def drive_for(self, seconds: float, *, allow_fill: bool = True, final: bool = False) -> None:
        until = time.monotonic() + seconds
        last_sample = 0.0
        while time.monotonic() < until:
            self.step(allow_fill=allow_fill)
            if time.monotonic() - last_sample > 2.0:
                self.sample(final=final)
                last_sample = time.monotonic()
            time.sleep(self.rng.uniform(0, 0.05))

    def settle(self, timeout_s: float = 180.0) -> None:
        """Stop the faults, ask every pipeline to warm, and wait until none is warming."""
        self.proxy.clear_faults()
        for pipeline in self.specs:
            self.call("POST", f"/v1/pipelines/{pipeline}/warm")
        deadline = time.monotonic() + timeout_s
        warming: list[str] = []
        while time.monotonic() < deadline:
            answer = self.call("GET", "/v1/pipelines")
            ok = answer is not None and answer.status_code == 200
            statuses = answer.json()["pipelines"] if answer is not None and ok else []
            warming = [p["id"] for p in statuses if p["state"] == "warming"]
            if answer is not None and not warming:
                break
            time.sleep(0.5)
        self.figures.stuck_warming.extend(warming)

    def check_accounting(self) -> None:
        answer = self.call("GET", "/v1/node")
        if answer is None or answer.status_code != 200:
            return
        info = answer.json()
        on_disk = sum(p.stat().st_size for p in (self.node.data_dir / "blobs").glob("*/*")
                      if p.is_file())
        self.figures.accounting.append(
            {"used": info["used"], "reserved": info["reserved"], "blobs_on_disk": on_disk})

    def verify_all_warm(self) -> None:
        answer = self.call("GET", "/v1/pipelines")
        if answer is None or answer.status_code != 200:
            return
        for status in answer.json()["pipelines"]:
            if status["state"] != "warm":
                continue
            names = [m["name"] for m in status["models"]]
            for tp_size in status["tp_sizes"]:
                for rank in range(tp_size):
                    self.verify_load(status["id"], tp_size, rank, names)


def _upload_models(seaweed: SeaweedServer, bucket: str, root: Path) -> dict[str, Path]:
    models: dict[str, Path] = {}
    for index, (layers, hidden, intermediate) in enumerate(_SHAPES):
        name = f"m{index}"
        directory = make_tiny_llama(root / name, num_layers=layers, hidden_size=hidden,
                                    intermediate_size=intermediate, num_heads=8, num_kv_heads=2,
                                    vocab_size=1001, tie=index % 2 == 0, seed=index)
        sums = []
        for path in sorted(directory.iterdir()):
            data = path.read_bytes()
            seaweed.put(bucket, f"{name}/{path.name}", data)
            sums.append(f"{hashlib.sha256(data).hexdigest()}  {path.name}\n")
        seaweed.put(bucket, f"{name}/SHA256SUMS", "".join(sums).encode())
        models[name] = directory
    return models


def run_soak(name: str, duration_s: float, *, kill_every_s: float, tmp_path: Path,
             seaweed: SeaweedServer, bucket: str, proxy: CountingProxy) -> Figures:
    seed = int(os.environ.get("WEIGHTCACHE_SOAK_SEED", "20261128"))
    figures = Figures(name=name, duration_s=duration_s, seed=seed)
    models = _upload_models(seaweed, bucket, tmp_path / "models")
    total = sum((d / "model.safetensors").stat().st_size for d in models.values())
    capacity = total  # about half the pipelines' bytes once TP 2 shards count
    mount_point = tmp_path / "fs"
    with small_filesystem(mount_point, int(total * 1.6)) as mounted:
        figures.disk_fill_mode = "tmpfs" if mounted else "none (mount not permitted)"
        node = NodeProcess(mount_point / "data", capacity=capacity, proxy=proxy,
                           seaweed=seaweed, log=tmp_path / "node.log")
        soak = Soak(figures, node, proxy, seaweed, models, bucket,
                    mount_point if mounted else None)
        node.start()
        try:
            final_phase = max(30.0, duration_s / 5)
            chaos_until = time.monotonic() + duration_s - final_phase
            while time.monotonic() < chaos_until:
                soak.drive_for(min(kill_every_s, max(0.0, chaos_until - time.monotonic())))
                if time.monotonic() < chaos_until:
                    soak.restart()
                    soak.check_accounting()
            # the last stretch: no kills, no full disk, so memory and descriptors can be seen
            soak.drive_for(final_phase, allow_fill=False, final=True)
            soak.settle()
            soak.verify_all_warm()
            soak.check_accounting()
        finally:
            node.stop()
            soak.http.close()
            figures.write()
    return figures


def check(figures: Figures) -> None:
    assert figures.integrity_violations == [], figures.integrity_violations[:5]
    assert figures.server_errors == [], figures.server_errors[:5]
    assert figures.stuck_warming == [], figures.stuck_warming
    assert figures.loads_verified > 0
    final = figures.accounting[-1]
    assert final["reserved"] == 0, final
    assert final["used"] == final["blobs_on_disk"], final
    # Flat memory and descriptors over the quiet last stretch: its second half no higher than
    # its first half plus a margin (allocator noise, a pipeline or two more in flight).
    half = len(figures.final_phase_rss_mib) // 2
    if half >= 2:
        early_rss = max(figures.final_phase_rss_mib[:half])
        late_rss = max(figures.final_phase_rss_mib[half:])
        assert late_rss <= early_rss * 1.25 + 32, (early_rss, late_rss)
        # descriptors by the median: fills still run in this stretch, and one sample taken
        # while a transfer has its parts open is a spike, not a leak (a leak lifts them all)
        early_fds = statistics.median(figures.final_phase_fds[:half])
        late_fds = statistics.median(figures.final_phase_fds[half:])
        assert late_fds <= early_fds + 16, (figures.final_phase_fds, early_fds, late_fds)


def test_soak_one_minute(tmp_path: Path, seaweed: SeaweedServer, bucket: str,
                         proxy: CountingProxy) -> None:
    figures = run_soak("short", 60, kill_every_s=20, tmp_path=tmp_path, seaweed=seaweed,
                       bucket=bucket, proxy=proxy)
    assert figures.kills >= 1
    check(figures)


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_soak(tmp_path: Path, seaweed: SeaweedServer, bucket: str, proxy: CountingProxy) -> None:
    duration = float(os.environ.get("WEIGHTCACHE_SOAK_S", "1800"))
    figures = run_soak("long", duration, kill_every_s=180, tmp_path=tmp_path, seaweed=seaweed,
                       bucket=bucket, proxy=proxy)
    chaos_s = duration - max(30.0, duration / 5)  # the last fifth runs without kills
    assert figures.kills >= chaos_s // 180 - 1
    check(figures)
