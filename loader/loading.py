"""A replica's cold start: lease, manifest, stream its rank's tensors into a device, release.

::

    result = load("chat-8b", tp_size=2, rank=0, device="cuda:0")
    result.tensors["model.layers.0.self_attn.q_proj.weight"]   # rank 0's slice, on cuda:0
    result.report.as_dict()                                    # stage timings and GB/s

Tensor keys are the HF tensor names (``"{model}/{name}"`` when a pipeline has several models:
:func:`~loader.manifest_stream.tensor_keys`). All of a rank's tensors are views into one flat
allocation on the device (one ``cudaMalloc``, no fragmentation); a tensor stays valid as long as
any view of it is alive.

The pieces, for callers that need only some of them: :class:`~loader.session.RankSession` (the
lease, the manifest, a source), :mod:`loader.manifest_stream` (a manifest's tensors into a
device, into existing tensors, or a batch at a time), :mod:`loader.report` (the results).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import torch

from clients.client import DEFAULT_URL
from loader.manifest_stream import load_manifest
from loader.report import LoadReport, LoadResult, MultiLoadResult
from loader.session import RankSession
from loader.stream import DEFAULT_REQUEST_SIZE, DEFAULT_WORKERS

__all__ = [
    "DEFAULT_URL",
    "LoadReport",
    "LoadResult",
    "MultiLoadResult",
    "default_devices",
    "load",
    "load_all_ranks",
]


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
    blobs found there, else by HTTP range requests spread over the nodes the manifest lists as
    holding each blob (a region), or over ``data_urls`` (default: the data plane URL the node
    advertises, else ``url``), failing over between them, and to ``url`` once they all fail
    (``report.fallback_reads`` says how many ranges did; ``report.bytes_by_node``,
    ``failed_nodes`` and ``failovers`` which nodes served and which failed). ``verify`` checks
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
    return LoadResult(tensors=tensors, manifest=session.manifest, report=session.report)


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
