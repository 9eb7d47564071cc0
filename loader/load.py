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

import contextlib
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import torch

from api.schema import Lease, Manifest, ManifestFile, ManifestTensor
from clients.errors import raise_for_status
from loader.errors import LoaderError, NoWeightsError
from loader.layout import plan_layout, tensor_view
from loader.ranges import BlobDigests
from loader.sinks import CpuSink, RingSink
from loader.sources import HttpRangeSource, LocalFileSource, RoutingSource, Source
from loader.stream import DEFAULT_REQUEST_SIZE, DEFAULT_WORKERS, StreamReport, stream

__all__ = [
    "DEFAULT_URL",
    "LoadReport",
    "LoadResult",
    "MultiLoadResult",
    "RankSession",
    "iter_tensors",
    "load",
    "load_all_ranks",
    "stream_into",
]

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


def _make_sink(
    size: int, device: torch.device, *, slot_size: int, workers: int
) -> CpuSink | RingSink:
    if device.type == "cpu":
        return CpuSink(size)
    return RingSink(size, device=device, slots=ring_slots(slot_size, workers), slot_size=slot_size)


def ring_slots(slot_size: int, workers: int, budget: int = RING_BUDGET) -> int:
    """How many staging slots a ring gets: enough for the readers, within ``budget`` bytes."""
    return max(2, min(workers + 4, budget // slot_size))


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
    Raises :class:`~clients.errors.NotWarmError` when the pipeline is not warm, the matching
    :class:`~clients.errors.ApiError` for other refusals, ``SourceError`` or ``IntegrityError``
    when the bytes cannot be had intact.
    """
    target = torch.device(device)
    with RankSession(
        pipeline,
        tp_size=tp_size,
        rank=rank,
        device=target,
        url=url,
        token=token,
        local_dir=local_dir,
        http=http,
        data_urls=data_urls,
    ) as session:
        tensors, session.report.stream = load_manifest(
            session.manifest,
            source=session.source,
            device=target,
            verify=verify,
            workers=workers,
            request_size=request_size,
        )
        session.note_fallback()
    return LoadResult(tensors=tensors, manifest=session.manifest, report=session.report)


class RankSession:
    """One rank of a pipeline, leased: its manifest and a source for its bytes until closed.

    ``with RankSession(...) as session`` takes the lease and the manifest; leaving the block
    closes the source and releases the lease, whatever happened (``report.total_s`` is set
    then). What to do with the bytes is the caller's: :func:`load_manifest` into a fresh flat
    allocation, :func:`loader.param_sink` into existing tensors, or :func:`iter_tensors`.
    """

    def __init__(
        self,
        pipeline: str,
        *,
        tp_size: int = 1,
        rank: int = 0,
        device: str | torch.device = "cpu",
        url: str | None = None,
        token: str | None = None,
        local_dir: Path | None = None,
        http: httpx.Client | None = None,
        data_urls: Sequence[str] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tp_size = tp_size
        self.rank = rank
        self.url = (url or os.environ.get("WEIGHTCACHE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("WEIGHTCACHE_TOKEN")
        self.report = LoadReport(
            pipeline=pipeline, tp_size=tp_size, rank=rank, device=str(torch.device(device))
        )
        self._headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self._own_client = http is None
        self._client = http or httpx.Client(timeout=httpx.Timeout(30.0))
        self._local_dir = local_dir
        self._data_urls = data_urls
        self._lease_url: str | None = None
        self._source: Source | None = None
        self.remote: HttpRangeSource | None = None
        self._manifest: Manifest | None = None
        self._started = 0.0

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise LoaderError("the session is not open")
        return self._manifest

    @property
    def source(self) -> Source:
        if self._source is None:
            raise LoaderError("the session is not open")
        return self._source

    def __enter__(self) -> RankSession:
        self._started = time.perf_counter()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        client, url, headers = self._client, self.url, self._headers
        response = client.post(f"{url}/v1/pipelines/{self.pipeline}/leases", headers=headers)
        raise_for_status(response, context=f"lease on {self.pipeline}")
        lease = Lease.model_validate_json(response.content)
        self._lease_url = f"{url}/v1/leases/{lease.lease_id}"
        self.report.lease_s = time.perf_counter() - self._started
        mark = time.perf_counter()
        response = client.get(
            f"{url}/v1/pipelines/{self.pipeline}/manifest",
            params={"tp_size": self.tp_size, "rank": self.rank},
            headers=headers,
        )
        raise_for_status(
            response,
            context=f"manifest of {self.pipeline} tp_size={self.tp_size} rank={self.rank}",
        )
        self._manifest = Manifest.model_validate_json(response.content)
        self.report.manifest_s = time.perf_counter() - mark
        if not self._manifest.tensors:
            # a pipeline with no weight tensors never "loads": nothing would reach the device
            raise NoWeightsError(
                f"{self.pipeline}: the manifest of tp_size={self.tp_size} rank={self.rank} "
                "holds no tensors"
            )
        data_urls = self._data_urls or _advertised_data_urls(client, url, headers)
        # The API serves the same verified bytes: the fallback when the data plane fails.
        fallback = [url] if url not in data_urls else []
        remote = HttpRangeSource(list(data_urls), token=self.token, fallback_urls=fallback)
        self.remote = remote
        self._source = (
            RoutingSource(LocalFileSource(self._local_dir), remote) if self._local_dir else remote
        )

    def note_fallback(self) -> None:
        """Copy into the report how many ranges fell back from the data plane to the API."""
        if self.remote is not None and self.remote.fallback_reads:
            self.report.fallback_reads = self.remote.fallback_reads
            self.report.fallback_reason = self.remote.fallback_reason

    def close(self) -> None:
        """Close the source, release the lease (idempotent)."""
        try:
            if self._source is not None:
                self._source.close()
            if self._lease_url is not None:
                _release(self._client, self._lease_url, self._headers)
                self._lease_url = None
        finally:
            if self._own_client:
                self._client.close()
            if self._started:
                self.report.total_s = time.perf_counter() - self._started


def _advertised_data_urls(client: httpx.Client, url: str, headers: dict[str, str]) -> list[str]:
    """The node's data plane (``GET /v1/node`` → ``data_url``), or ``url`` when it has none."""
    response = client.get(f"{url}/v1/node", headers=headers)
    data_url = response.json().get("data_url") if response.status_code == 200 else None
    return [data_url.rstrip("/")] if isinstance(data_url, str) and data_url else [url]


def _release(client: httpx.Client, lease_url: str, headers: dict[str, str]) -> None:
    # A lease that cannot be released expires on its own; never hide the load's own outcome.
    with contextlib.suppress(httpx.HTTPError):
        client.delete(lease_url, headers=headers)


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
    try:
        return _load_flat(
            manifest.tensors,
            tensor_keys(manifest),
            manifest_digests(manifest) if verify else None,
            source=source,
            device=torch.device(device),
            workers=workers,
            request_size=request_size,
        )
    finally:
        source.close()


def manifest_digests(manifest: Manifest) -> dict[str, BlobDigests]:
    """Each blob's chunk digests, for verifying; LoaderError when a blob has none."""
    known = {
        blob.sha256: BlobDigests(blob.size, blob.chunk_size, tuple(blob.chunk_xxh3_128))
        for blob in manifest.blobs
    }
    missing = {t.blob for t in manifest.tensors} - known.keys()
    if missing:
        raise LoaderError(f"cannot verify: the manifest has no digests for {sorted(missing)}")
    return known


def staging_slot_size(
    digests: Mapping[str, BlobDigests] | None, request_size: int, total: int
) -> int:
    """The bytes one staging slot needs: one request, or one whole digest chunk when verifying."""
    if digests is not None:
        slot = max((min(d.chunk_size, d.size) for d in digests.values()), default=1)
    else:
        slot = min(request_size, total)
    return max(slot, 1)


def _load_flat(
    tensors: Sequence[ManifestTensor],
    keys: Sequence[str],
    digests: Mapping[str, BlobDigests] | None,
    *,
    source: Source,
    device: torch.device,
    workers: int,
    request_size: int,
) -> tuple[dict[str, torch.Tensor], StreamReport]:
    placements, ranges, size = plan_layout(tensors, keys=keys)
    slot_size = staging_slot_size(digests, request_size, size)
    sink = _make_sink(size, device, slot_size=slot_size, workers=workers)
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
    return {p.key: tensor_view(sink.output, p) for p in placements}, report


def iter_tensors(
    manifest: Manifest,
    *,
    source: Source,
    keys: Sequence[str] | None = None,
    verify: bool = False,
    batch_bytes: int = 256 << 20,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
    report: StreamReport | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` for the manifest's tensors on the CPU, a batch at a time.

    Memory stays bounded by about ``batch_bytes`` (or the largest tensor, when bigger): a batch
    is streamed, its tensors are yielded, and its buffer is dropped before the next one is read,
    so a consumer that copies each tensor away (an engine's ``load_weights``) never holds the
    whole model. ``keys`` selects tensors by key (default: all). ``report`` accumulates bytes
    and time over the batches. The source is not closed.
    """
    all_keys = tensor_keys(manifest)
    wanted = set(keys) if keys is not None else set(all_keys)
    chosen = sorted(
        (i for i, key in enumerate(all_keys) if key in wanted),
        key=lambda i: (manifest.tensors[i].blob, manifest.tensors[i].offset),
    )
    digests = manifest_digests(manifest) if verify else None
    batches: list[list[int]] = []
    size = 0
    for index in chosen:
        length = manifest.tensors[index].length
        if not batches or size + length > batch_bytes:
            batches.append([])
            size = 0
        batches[-1].append(index)
        size += length
    for batch in batches:
        tensors, part = _load_flat(
            [manifest.tensors[i] for i in batch],
            [all_keys[i] for i in batch],
            digests,
            source=source,
            device=torch.device("cpu"),
            workers=workers,
            request_size=request_size,
        )
        if report is not None:
            _accumulate(report, part)
        for index in batch:
            key = all_keys[index]
            yield key, tensors.pop(key)
        del tensors  # the batch's buffer goes once the consumer lets go of its tensors


def _accumulate(total: StreamReport, part: StreamReport) -> None:
    total.connect_s += part.connect_s
    total.stream_s += part.stream_s
    total.verify_s += part.verify_s
    total.bytes_delivered += part.bytes_delivered
    total.bytes_read += part.bytes_read
    total.requests += part.requests
    total.workers = part.workers
    total.verified_chunks += part.verified_chunks


def stream_into(
    manifest: Manifest,
    destinations: Mapping[str, torch.Tensor],
    *,
    source: Source,
    device: torch.device | str,
    keys: Sequence[str] | None = None,
    verify: bool = False,
    workers: int = DEFAULT_WORKERS,
    request_size: int = DEFAULT_REQUEST_SIZE,
    ring_budget: int = RING_BUDGET,
) -> StreamReport:
    """Stream the manifest's tensors straight into ``destinations`` (key → existing tensor).

    The destinations are the engine's own storage (parameters, or blocks of their rows), all on
    ``device``; the staging ring (at most ``ring_budget`` bytes) is the only memory allocated.
    Tensors whose key has no destination are not read. ``keys`` are the manifest tensors' keys
    (default :func:`tensor_keys`). The source is not closed.
    """
    from loader.param_sink import ParamSink, plan_param_stream

    target = torch.device(device)
    segments, ranges = plan_param_stream(
        manifest.tensors,
        destinations,
        keys=keys if keys is not None else tensor_keys(manifest),
        # On the CPU every request then covers one tensor and is read in place, unstaged.
        merge=target.type != "cpu",
    )
    digests = manifest_digests(manifest) if verify else None
    slot_size = staging_slot_size(digests, request_size, sum(r.length for r in ranges))
    sink = ParamSink(
        segments,
        device=target,
        slots=ring_slots(slot_size, workers, ring_budget),
        slot_size=slot_size,
    )
    try:
        return stream(
            ranges,
            source=source,
            sink=sink,
            digests=digests,
            request_size=request_size,
            workers=workers,
        )
    finally:
        sink.close()


def default_devices(count: int) -> list[torch.device]:
    """One device per rank: the current accelerator's first ``count``, else the CPU."""
    accelerator = getattr(torch, "accelerator", None)
    kind = accelerator.current_accelerator() if accelerator and accelerator.is_available() else None
    if kind is None:
        return [torch.device("cpu")] * count
    return [torch.device(kind.type, index) for index in range(count)]


def load_all_ranks(
    pipeline: str,
    *,
    tp_size: int,
    devices: Sequence[str | torch.device] | None = None,
    **options: Any,
) -> MultiLoadResult:
    """Load every rank of ``pipeline`` at ``tp_size`` at once, rank ``r`` into ``devices[r]``.

    ``devices`` defaults to the accelerator's devices 0 .. ``tp_size - 1`` (``cuda:0`` ... on
    NVIDIA), or the CPU for every rank when there is no accelerator. Each rank runs :func:`load` in
    its own thread (with its own lease and staging ring), so the wall time is that of the
    slowest shard. ``options`` go to :func:`load` unchanged.
    """
    targets = list(devices) if devices is not None else default_devices(tp_size)
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
