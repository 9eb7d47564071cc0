"""What a load returns: a rank's tensors, the manifest they came from, and how it went."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from api.schema import Manifest, ManifestFile
from loader.stream import StreamReport

__all__ = ["LoadReport", "LoadResult", "MultiLoadResult"]


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
    #: Bytes each cache node (by base URL) sent over HTTP, whole digest chunks when verifying.
    bytes_by_node: dict[str, int] = field(default_factory=dict)
    #: Nodes that failed a read during the load, with their first failure.
    failed_nodes: dict[str, str] = field(default_factory=dict)
    #: Ranges re-read from another node after one failed.
    failovers: int = 0

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
            "bytes_by_node": dict(self.bytes_by_node),
            "failed_nodes": dict(self.failed_nodes),
            "failovers": self.failovers,
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
