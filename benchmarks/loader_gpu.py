"""Replica load throughput: weightcache's stream engine against the usual loaders, in one run.

On a GPU host (the ANCHORS.md setup: one H100, checkpoint files on local disk)::

    .venv/bin/python benchmarks/loader_gpu.py --device cuda:0 --dir /mnt/nvme/wc-bench

Here, to prove it runs (CPU target, a 1/1000-size checkpoint)::

    .venv/bin/python benchmarks/loader_gpu.py --device cpu --scale 0.001 --repeat 2

It writes a Llama-3.1-8B-shaped bf16 checkpoint (291 tensors, ~16.06 GB at ``--scale 1``; each
tensor's first dimension is multiplied by ``--scale``) as four safetensors files inside a node
data dir (``blobs/ab/<id>``; the ids are not content digests, nothing here checks them), then
times, warm (files in the page cache) and cold (dropped with ``posix_fadvise(DONTNEED)``
before each run; the files are fsynced first, so the drop takes):

- ``safetensors.load_file(device=...)`` per file, and ``load_file()`` on CPU then ``.to(device)``;
- InstantTensor and Run:ai Model Streamer, when importable (else recorded as skipped);
- weightcache ``LocalFileSource`` -> device (the node-local path);
- weightcache ``HttpRangeSource`` from a local multi-process range server
  (``tests/fixtures/blob_server.py``, sendfile, SO_REUSEPORT): the transport alone;
- a real cache node on the same host (``weightcache serve`` with ``--http-processes`` data-plane
  workers), the checkpoint registered as a ``file://`` pipeline with TP sizes 1 and 2, then
  ``loader.load`` of it over HTTP, node-local (``local_dir``), and TP 2 rank 0 (its shard: half
  the split bytes; at ``--scale`` below 1 the shapes no longer match the config, so TP 2 falls
  back to full-tensor mode and reads everything).

Each path runs ``--repeat`` times; the JSON in ``benchmarks/results/`` keeps every time, the
median, GB/s, and the machine it ran on. Times include a device synchronise. With
``--device cpu`` the safetensors baselines only mmap the files (pages are touched later, if
ever), so their CPU figures are not comparable; on a GPU every path moves every byte.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from api.schema import Manifest, ManifestTensor
from loader.loading import load
from loader.manifest_stream import load_manifest
from loader.safetensors_format import encode_header, read_header
from loader.sources import HttpRangeSource, LocalFileSource, blob_path

HIDDEN, INTER, VOCAB, LAYERS, KV = 4096, 14336, 128256, 32, 1024
ROOT = Path(__file__).resolve().parents[1]


def llama_8b_shapes(scale: float) -> list[tuple[str, tuple[int, int] | tuple[int]]]:
    """The 291 tensors of Llama-3.1-8B with their first dimension scaled."""

    def rows(n: int) -> int:
        return max(1, round(n * scale))

    shapes: list[tuple[str, tuple[int, int] | tuple[int]]] = [
        ("model.embed_tokens.weight", (rows(VOCAB), HIDDEN))
    ]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        shapes += [
            (f"{p}.self_attn.q_proj.weight", (rows(HIDDEN), HIDDEN)),
            (f"{p}.self_attn.k_proj.weight", (rows(KV), HIDDEN)),
            (f"{p}.self_attn.v_proj.weight", (rows(KV), HIDDEN)),
            (f"{p}.self_attn.o_proj.weight", (rows(HIDDEN), HIDDEN)),
            (f"{p}.mlp.gate_proj.weight", (rows(INTER), HIDDEN)),
            (f"{p}.mlp.up_proj.weight", (rows(INTER), HIDDEN)),
            (f"{p}.mlp.down_proj.weight", (rows(HIDDEN), INTER)),
            (f"{p}.input_layernorm.weight", (HIDDEN,)),
            (f"{p}.post_attention_layernorm.weight", (HIDDEN,)),
        ]
    shapes += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (rows(VOCAB), HIDDEN))]
    return shapes


def write_checkpoint(data_dir: Path, scale: float, files: int = 4) -> list[Path]:
    """Write the checkpoint as ``files`` safetensors blobs of about equal size; return paths."""
    shapes = llama_8b_shapes(scale)
    sizes = [2 * _numel(shape) for _, shape in shapes]
    target = sum(sizes) / files
    groups: list[list[int]] = [[]]
    running = 0
    for index, size in enumerate(sizes):
        if running >= target * len(groups) and len(groups) < files:
            groups.append([])
        groups[-1].append(index)
        running += size
    paths = []
    generator = torch.Generator().manual_seed(0)
    for number, group in enumerate(groups):
        sha = hashlib.sha256(f"llama-8b-{scale}-{number}".encode()).hexdigest()
        path = blob_path(data_dir, sha)
        paths.append(path)
        if path.exists():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        header, _ = encode_header(
            [(shapes[i][0], "BF16", shapes[i][1], sizes[i]) for i in group], {"format": "pt"}
        )
        temp = path.with_suffix(".tmp")
        with temp.open("wb") as out:
            out.write(header)
            for i in group:
                data = torch.randint(0, 256, (sizes[i],), dtype=torch.uint8, generator=generator)
                out.write(data.numpy().tobytes())
            out.flush()
            os.fsync(out.fileno())
        temp.rename(path)
    return paths


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for dim in shape:
        count *= dim
    return count


def manifest_for(paths: list[Path]) -> Manifest:
    tensors = []
    for path in paths:
        header = read_header(path)
        for info in header.tensors:
            tensors.append(
                ManifestTensor(
                    model="llm",
                    name=info.name,
                    dtype=info.dtype,
                    shape=list(info.shape),
                    blob=path.name,
                    offset=info.absolute_offset(header.data_offset),
                    length=info.nbytes,
                )
            )
    total = sum(t.length for t in tensors)
    return Manifest(
        pipeline="bench", tp_size=1, rank=0, bytes_total=total, files=[], tensors=tensors
    )


def drop_cache(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_cache(paths: list[Path]) -> None:
    for path in paths:
        with path.open("rb") as handle:
            while handle.read(64 << 20):
                pass


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def time_it(run: Callable[[], Any], device: torch.device) -> float:
    started = time.perf_counter()
    result = run()
    _sync(device)
    elapsed = time.perf_counter() - started
    del result
    _free()
    return elapsed


def start_http_server(data_dir: Path, processes: int) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "tests" / "fixtures" / "blob_server.py"),
            str(data_dir),
            "--port",
            str(port),
            "--processes",
            str(processes),
        ],
        start_new_session=True,  # its own process group, so stopping it stops every worker
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    server.kill()
    raise RuntimeError("range server did not start")


LLAMA_8B_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": HIDDEN,
    "intermediate_size": INTER,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "num_hidden_layers": LAYERS,
    "vocab_size": VOCAB,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
}


def start_node(work: Path, model_dir: Path, workers: int) -> tuple[subprocess.Popen[bytes], str]:
    """``weightcache serve`` on loopback with ``workers`` data-plane processes."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable, "-m", "clients.cli", "serve",
        "--data-dir", str(work / "node"), "--port", str(port), "--capacity", "1TiB",
        "--data-workers", str(workers), "--local-root", str(model_dir),
    ]  # fmt: skip
    node = subprocess.Popen(command, cwd=ROOT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return node, url
        except httpx.HTTPError:
            time.sleep(0.2)
    node.kill()
    raise RuntimeError("cache node did not start")


def node_pipeline(url: str, paths: list[Path], model_dir: Path) -> dict[str, int]:
    """Register the checkpoint (hard links, no copy) with TP 1 and 2; wait until warm.

    Returns the tensor bytes each node leg moves.
    """
    model_dir.mkdir(parents=True, exist_ok=True)
    for number, path in enumerate(paths, start=1):
        name = model_dir / f"model-{number:05d}-of-{len(paths):05d}.safetensors"
        if not name.exists():
            os.link(path, name)
    (model_dir / "config.json").write_text(json.dumps(LLAMA_8B_CONFIG))
    body = {"models": [{"name": "llm", "source": f"file://{model_dir}"}], "tp_sizes": [1, 2]}
    httpx.put(f"{url}/v1/pipelines/bench", json=body, timeout=600).raise_for_status()
    started = time.monotonic()
    while (state := httpx.get(f"{url}/v1/pipelines/bench").json())["state"] != "warm":
        if state["state"] == "failed":
            raise RuntimeError(f"warm failed: {state['error']}")
        time.sleep(0.5)
    print(f"node: pipeline warm (TP 1 and 2) in {time.monotonic() - started:.1f} s")
    sizes = {}
    for tp_size in (1, 2):
        manifest = httpx.get(
            f"{url}/v1/pipelines/bench/manifest", params={"tp_size": tp_size, "rank": 0}
        ).json()
        sizes[f"tp{tp_size}"] = sum(t["length"] for t in manifest["tensors"])
    return sizes


def candidates(
    paths: list[Path], manifest: Manifest, data_dir: Path, device: torch.device, args: Any
) -> dict[str, Callable[[], Any] | str]:
    """Every path to time: a callable, or a string saying why it is skipped."""
    import safetensors.torch

    runs: dict[str, Callable[[], Any] | str] = {}
    runs["safetensors.load_file(device)"] = lambda: [
        safetensors.torch.load_file(p, device=str(device)) for p in paths
    ]
    runs["safetensors.load_file(cpu).to(device)"] = lambda: [
        {k: v.to(device) for k, v in safetensors.torch.load_file(p).items()} for p in paths
    ]
    try:
        from runai_model_streamer import SafetensorsStreamer

        def runai() -> list[torch.Tensor]:
            out = []
            with SafetensorsStreamer() as streamer:
                streamer.stream_files([str(p) for p in paths])
                for _, tensor in streamer.get_tensors():
                    out.append(tensor.to(device))
            return out

        runs["runai SafetensorsStreamer"] = runai
    except ImportError as error:
        runs["runai SafetensorsStreamer"] = f"skipped: {error}"
    try:
        import instanttensor

        def instant() -> dict[str, torch.Tensor]:
            with instanttensor.safe_open(
                [str(p) for p in paths], framework="pt", device=str(device)
            ) as f:
                return dict(f.tensors())

        runs["instanttensor"] = instant
    except ImportError as error:
        runs["instanttensor"] = f"skipped: {error}"

    def local() -> Any:
        return load_manifest(
            manifest,
            source=LocalFileSource(data_dir),
            device=device,
            workers=args.workers,
            request_size=args.request_mib << 20,
        )

    runs["weightcache local file"] = local
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--dir", type=Path, default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=16)
    parser.add_argument("--request-mib", type=int, default=16)
    parser.add_argument("--http-processes", type=int, default=8)
    parser.add_argument("--no-cold", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    device = torch.device(args.device)
    work = args.dir or Path(tempfile.mkdtemp(prefix="wc-loader-bench-"))
    data_dir = work / "data"
    started = time.perf_counter()
    paths = write_checkpoint(data_dir, args.scale)
    manifest = manifest_for(paths)
    total = manifest.bytes_total
    print(
        f"checkpoint: {len(manifest.tensors)} tensors, {total / 1e9:.2f} GB "
        f"in {time.perf_counter() - started:.1f} s at {work}"
    )

    processes: list[subprocess.Popen[bytes]] = []
    model_dir = work / "model"
    out = args.out / f"loader_gpu-{device.type}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    results: dict[str, Any] = {}
    try:
        server, url = start_http_server(data_dir, args.http_processes)
        processes.append(server)
        node, node_url = start_node(work, model_dir, args.http_processes)
        processes.append(node)
        leg_bytes = node_pipeline(node_url, paths, model_dir)
        runs = candidates(paths, manifest, data_dir, device, args)

        def over_http() -> Any:
            source = HttpRangeSource([url], connections=args.workers)
            return load_manifest(
                manifest,
                source=source,
                device=device,
                workers=args.workers,
                request_size=args.request_mib << 20,
            )

        runs["weightcache http (range server)"] = over_http
        options = {"workers": args.workers, "request_size": args.request_mib << 20}
        runs["weightcache node http"] = lambda: load(
            "bench", url=node_url, device=device, **options
        )
        runs["weightcache node-local shard"] = lambda: load(
            "bench", url=node_url, device=device, local_dir=work / "node", **options
        )
        runs["weightcache node http tp2 rank0"] = lambda: load(
            "bench", tp_size=2, rank=0, url=node_url, device=device, **options
        )
        sizes = dict.fromkeys(runs, total)
        sizes["weightcache node http tp2 rank0"] = leg_bytes["tp2"]
        for name, run in runs.items():
            if isinstance(run, str):
                results[name] = {"skipped": run}
                print(f"{name:40s} {run}")
                continue
            entry: dict[str, Any] = {}
            modes = ["warm"] + ([] if args.no_cold else ["cold"])
            for mode in modes:
                times = []
                for _ in range(args.repeat):
                    if mode == "cold":
                        drop_cache(paths)
                    else:
                        warm_cache(paths)
                    try:
                        times.append(time_it(run, device))
                    except Exception as error:  # a peer library failing is a result, not a crash
                        entry[mode] = {"error": repr(error)}
                        break
                else:
                    median = statistics.median(times)
                    moved = sizes[name]
                    entry[mode] = {
                        "times_s": times,
                        "median_s": median,
                        "bytes": moved,
                        "gb_per_s": moved / median / 1e9,
                    }
                    print(f"{name:40s} {mode}: {median:.3f} s  {moved / median / 1e9:6.2f} GB/s")
            results[name] = entry
            # after every path, so that a run cut short still leaves what it measured
            write_report(out, args, device, manifest, len(paths), results)
    finally:
        for process in processes:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait()
    print(f"wrote {out}")


def write_report(
    out: Path,
    args: Any,
    device: torch.device,
    manifest: Manifest,
    files: int,
    results: dict[str, Any],
) -> None:
    """The JSON report: every time, the machine, the checkpoint and the settings."""
    machine = {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
    }
    report = {
        "benchmark": "loader_gpu",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine,
        "checkpoint": {
            "tensors": len(manifest.tensors),
            "bytes": manifest.bytes_total,
            "scale": args.scale,
            "files": files,
        },
        "settings": {
            "workers": args.workers,
            "request_mib": args.request_mib,
            "http_processes": args.http_processes,
            "repeat": args.repeat,
        },
        "results": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
