"""A replica's cold start: lease, manifest, stream its rank's tensors into a device, release.

::

    result = load("chat-8b", tp_size=2, rank=0, device="cuda:0")
    result.tensors["model.layers.0.self_attn.q_proj.weight"]   # rank 0's slice, on cuda:0
    result.report.as_dict()                                    # stage timings and GB/s

Tensor keys are the HF tensor names. A pipeline with more than one model (say ASR + LLM) keys
them ``"{model}/{name}"`` instead, so that two models' ``lm_head.weight`` cannot collide; with
one model the plain name is kept, which is what an engine's ``load_weights`` expects.

All of a rank's tensors are views into one flat allocation on the device (one ``cudaMalloc``,
no fragmentation); a tensor stays valid as long as any view of it is alive.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from api.schema import Lease, Manifest, ManifestFile
from loader.errors import LoaderError, NotWarmError, ServerError
from loader.layout import plan_layout, tensor_view
from loader.ranges import BlobDigests
from loader.sinks import CpuSink, RingSink, Sink
from loader.sources import HttpRangeSource, LocalFileSource, RoutingSource, Source
from loader.stream import DEFAULT_REQUEST_SIZE, DEFAULT_WORKERS, StreamReport, stream

__all__ = ["DEFAULT_URL", "LoadReport", "LoadResult", "MultiLoadResult", "load", "load_all_ranks"]

DEFAULT_URL = "http://127.0.0.1:8470"
#: Staging memory a GPU load may pin (the ring is this big at most, whatever the model size).
RING_BUDGET = 512 << 20


@dataclass(slots=True)
class LoadReport:
    """Stage timings of one load (seconds) and its throughput."""

    pipeline: str
    tp_size: int
    rank: int
    device: str
    lease_s: float = 0.0
    manifest_s: float = 0.0
    total_s: float = 0.0
    stream: StreamReport = field(default_factory=StreamReport)
    #: Ranges read from the node's API URL because its data plane failed, and why.
    fallback_reads: int = 0
    fallback_reason: str | None = None

    @property
    def bytes(self) -> int:
        """Tensor bytes delivered to the device."""
        return self.stream.bytes_delivered

    @property
    def gb_per_s(self) -> float:
        """Delivered GB/s over the streaming stage."""
        return self.stream.gb_per_s

    def as_dict(self) -> dict[str, Any]:
        """The report as JSON-able values (what ``weightcache load --json`` prints)."""
        return {
            "pipeline": self.pipeline,
            "tp_size": self.tp_size,
            "rank": self.rank,
            "device": self.device,
            "lease_s": self.lease_s,
            "manifest_s": self.manifest_s,
            "total_s": self.total_s,
            "fallback_reads": self.fallback_reads,
            "fallback_reason": self.fallback_reason,
            **self.stream.as_dict(),
        }


@dataclass(slots=True)
class LoadResult:
    """A rank's tensors on its device, the manifest they came from, and how it went."""

    tensors: dict[str, torch.Tensor]
    manifest: Manifest
    report: LoadReport

    @property
    def files(self) -> list[ManifestFile]:
        """The pipeline's non-weight files (config, tokenizer) as the manifest lists them."""
        return self.manifest.files


@dataclass(slots=True)
class MultiLoadResult:
    """Every rank's result, and the wall time of loading them all at once."""

    ranks: list[LoadResult]
    wall_s: float


def tensor_keys(manifest: Manifest) -> list[str]:
    """The key of each manifest tensor: its name, or ``model/name`` when several models."""
    models = {tensor.model for tensor in manifest.tensors}
    if len(models) > 1:
        return [f"{tensor.model}/{tensor.name}" for tensor in manifest.tensors]
    return [tensor.name for tensor in manifest.tensors]


def _raise_for_status(response: httpx.Response, what: str) -> None:
    """The one place the loader turns a node's error answer into a loader error."""
    if response.is_success:
        return
    code: str | None = None
    message = response.text[:500]
    state: str | None = None
    try:
        error = response.json().get("error", {})
        code = error.get("code")
        message = error.get("message", message)
        state = error.get("state")
    except (ValueError, AttributeError):
        pass
    if response.status_code == 409 and code == "not_warm":
        raise NotWarmError(f"{what}: the pipeline is not warm yet (state {state})", state=state)
    raise ServerError(
        f"{what}: HTTP {response.status_code} {code or ''} {message}".strip(),
        status=response.status_code,
        code=code,
    )


def _make_sink(size: int, device: torch.device, *, slot_size: int, workers: int) -> Sink:
    if device.type == "cpu":
        return CpuSink(size)
    slots = max(2, min(workers + 4, RING_BUDGET // slot_size))
    return RingSink(size, device=device, slots=slots, slot_size=slot_size)


def load(
    pipeline: str,
    *,
    tp_size: int = 1,
    rank: int = 0,
    device: str | torch.device = "cpu",
    url: str | None = None,
    token: str | None = None,
    local_dir: Path | None = None,
    verify: bool = False,
    http: httpx.Client | None = None,
    data_urls: Sequence[str] | None = None,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
) -> LoadResult:
    """Load rank ``rank`` of ``pipeline`` at ``tp_size`` into ``device``.

    ``url`` defaults to ``WEIGHTCACHE_URL`` or :data:`DEFAULT_URL`, ``token`` to
    ``WEIGHTCACHE_TOKEN``. Bytes come from ``local_dir`` (a node data dir on this host) for the
    blobs found there, else by HTTP range requests spread over ``data_urls`` (default: the data
    plane URL the node advertises, else ``url``), failing over between them, and to ``url``
    once they all fail (``report.fallback_reads`` says how many ranges did). ``verify`` checks
    every byte against the manifest's chunk digests. The lease is released whatever happens.
    Raises :class:`NotWarmError` when the pipeline is not warm, :class:`ServerError` for other
    refusals, ``SourceError`` or ``IntegrityError`` when the bytes cannot be had intact.
    """
    url = (url or os.environ.get("WEIGHTCACHE_URL") or DEFAULT_URL).rstrip("/")
    token = token if token is not None else os.environ.get("WEIGHTCACHE_TOKEN")
    target = torch.device(device)
    report = LoadReport(pipeline=pipeline, tp_size=tp_size, rank=rank, device=str(target))
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    client = http or httpx.Client(timeout=httpx.Timeout(30.0))
    started = time.perf_counter()
    try:
        response = client.post(f"{url}/v1/pipelines/{pipeline}/leases", headers=headers)
        _raise_for_status(response, f"lease on {pipeline}")
        lease = Lease.model_validate_json(response.content)
        report.lease_s = time.perf_counter() - started
        try:
            mark = time.perf_counter()
            response = client.get(
                f"{url}/v1/pipelines/{pipeline}/manifest",
                params={"tp_size": tp_size, "rank": rank},
                headers=headers,
            )
            _raise_for_status(response, f"manifest of {pipeline} tp_size={tp_size} rank={rank}")
            manifest = Manifest.model_validate_json(response.content)
            report.manifest_s = time.perf_counter() - mark
            data_urls = data_urls or _advertised_data_urls(client, url, headers)
            # The API serves the same verified bytes: the fallback when the data plane fails.
            fallback = [url] if url not in data_urls else []
            remote = HttpRangeSource(list(data_urls), token=token, fallback_urls=fallback)
            source: Source = (
                RoutingSource(LocalFileSource(local_dir), remote) if local_dir else remote
            )
            tensors, report.stream = load_manifest(
                manifest,
                source=source,
                device=target,
                verify=verify,
                workers=workers,
                request_size=request_size,
            )
            report.fallback_reads = remote.fallback_reads
            report.fallback_reason = remote.fallback_reason if remote.fallback_reads else None
        finally:
            _release(client, f"{url}/v1/leases/{lease.lease_id}", headers)
    finally:
        if http is None:
            client.close()
    report.total_s = time.perf_counter() - started
    return LoadResult(tensors=tensors, manifest=manifest, report=report)


def _advertised_data_urls(client: httpx.Client, url: str, headers: dict[str, str]) -> list[str]:
    """The node's data plane (``GET /v1/node`` → ``data_url``), or ``url`` when it has none."""
    response = client.get(f"{url}/v1/node", headers=headers)
    data_url = response.json().get("data_url") if response.status_code == 200 else None
    return [data_url.rstrip("/")] if isinstance(data_url, str) and data_url else [url]


def _release(client: httpx.Client, lease_url: str, headers: dict[str, str]) -> None:
    # A lease that cannot be released expires on its own; never hide the load's own outcome.
    try:
        client.delete(lease_url, headers=headers)
    except httpx.HTTPError:
        pass


def load_manifest(
    manifest: Manifest,
    *,
    source: Source,
    device: torch.device | str = "cpu",
    verify: bool = False,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
) -> tuple[dict[str, torch.Tensor], StreamReport]:
    """Stream a manifest's tensors from ``source`` into ``device`` (closes ``source``)."""
    target = torch.device(device)
    placements, ranges, size = plan_layout(manifest.tensors, keys=tensor_keys(manifest))
    digests: dict[str, BlobDigests] | None = None
    if verify:
        known = {
            blob.sha256: BlobDigests(blob.size, blob.chunk_size, tuple(blob.chunk_xxh3_128))
            for blob in manifest.blobs
        }
        missing = {t.blob for t in manifest.tensors} - known.keys()
        if missing:
            raise LoaderError(f"cannot verify: the manifest has no digests for {sorted(missing)}")
        digests = known
    # A staging slot holds one request: a whole digest chunk when verifying.
    if digests is not None:
        slot_size = max((min(d.chunk_size, d.size) for d in digests.values()), default=1)
    else:
        slot_size = min(request_size, size)
    slot_size = max(slot_size, 1)
    sink = _make_sink(size, target, slot_size=slot_size, workers=workers)
    try:
        report = stream(
            ranges,
            source=source,
            sink=sink,
            digests=digests,
            request_size=request_size,
            workers=workers,
        )
    finally:
        sink.close()
        source.close()
    tensors = {p.key: tensor_view(sink.output, p) for p in placements}
    return tensors, report


def load_all_ranks(
    pipeline: str,
    *,
    tp_size: int,
    devices: Sequence[str] | None = None,
    **options: Any,
) -> MultiLoadResult:
    """Load every rank of ``pipeline`` at ``tp_size`` at once, rank ``r`` into ``devices[r]``.

    ``devices`` defaults to ``cuda:0`` .. ``cuda:{tp_size-1}``. Each rank runs :func:`load` in
    its own thread (with its own lease and staging ring), so the wall time is that of the
    slowest shard. ``options`` go to :func:`load` unchanged.
    """
    targets = list(devices) if devices is not None else [f"cuda:{r}" for r in range(tp_size)]
    if len(targets) != tp_size:
        raise ValueError(f"{len(targets)} devices for tp_size {tp_size}")
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=tp_size, thread_name_prefix="wc-rank") as pool:
        futures = [
            pool.submit(load, pipeline, tp_size=tp_size, rank=rank, device=target, **options)
            for rank, target in enumerate(targets)
        ]
        results = [future.result() for future in futures]
    return MultiLoadResult(ranks=results, wall_s=time.perf_counter() - started)
