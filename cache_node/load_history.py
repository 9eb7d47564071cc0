"""Cold-start history: what replicas report about their loads, kept per pipeline and measured.

Every load (``weightcache load``, the vLLM plugin) reports its stage timings back to the node.
The node keeps the last ``limit`` reports of each pipeline in its metadata store, under
``loads:<tenant>/<pipeline id>``, so the history survives a restart and is shared by the nodes of
a region, and observes them in the cold-start histograms of :class:`NodeMetrics` (I10).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from api.schema import LoadReport, LoadStages
from cache_node.errors import InvalidInput
from cache_node.metadata import KeyValue
from cache_node.metrics import NodeMetrics

__all__ = ["DEFAULT_LIMIT", "STAGES", "LoadHistory", "history_key"]

DEFAULT_LIMIT = 50
STAGES: tuple[str, ...] = tuple(LoadStages.model_fields)


def history_key(tenant: str, pipeline_id: str) -> str:
    """The metadata key of one pipeline's load history."""
    return f"loads:{tenant}/{pipeline_id}"


class LoadHistory:
    """The bounded, per-pipeline history of replica loads, and the metrics they feed."""

    def __init__(
        self, meta: KeyValue, metrics: NodeMetrics, *, limit: int = DEFAULT_LIMIT
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be at least 1")
        self.meta = meta
        self.metrics = metrics
        self.limit = limit
        # read-modify-write of one key: two reports arriving together must both be kept
        self._lock = threading.Lock()

    def record(
        self, tenant: str, pipeline_id: str, report: LoadReport, *, now: float | None = None
    ) -> LoadReport:
        """Keep ``report`` (stamped with the pipeline and, if it has none, the time) and observe
        it in the metrics. Returns the stored report."""
        if report.pipeline is not None and report.pipeline != pipeline_id:
            raise InvalidInput(
                f"report is for pipeline {report.pipeline!r}, posted to {pipeline_id!r}",
                field="pipeline",
            )
        stored = report.model_copy(
            update={
                "pipeline": pipeline_id,
                "at": report.at if report.at is not None else (now or time.time()),
            }
        )
        key = history_key(tenant, pipeline_id)
        with self._lock:
            entries = self._entries(key)
            entries.append(stored.model_dump(mode="json"))
            self.meta.set(key, {"loads": entries[-self.limit :]})
        self._observe(stored)
        return stored

    def recent(
        self, tenant: str, pipeline_id: str, *, limit: int | None = None
    ) -> list[LoadReport]:
        """The pipeline's loads, newest first (at most ``limit``)."""
        entries = self._entries(history_key(tenant, pipeline_id))
        reports = [LoadReport.model_validate(e) for e in reversed(entries)]
        return reports[:limit] if limit is not None else reports

    def recent_of(
        self, pipelines: Iterable[tuple[str, str]], *, limit: int = DEFAULT_LIMIT
    ) -> list[LoadReport]:
        """The newest ``limit`` loads over several ``(tenant, pipeline id)`` pairs."""
        merged: list[LoadReport] = []
        for tenant, pipeline_id in pipelines:
            merged.extend(self.recent(tenant, pipeline_id, limit=limit))
        merged.sort(key=lambda r: r.at or 0.0, reverse=True)
        return merged[:limit]

    def forget(self, tenant: str, pipeline_id: str) -> None:
        """Drop a pipeline's history (when the pipeline is deleted)."""
        with self._lock:
            self.meta.delete(history_key(tenant, pipeline_id))

    def _entries(self, key: str) -> list[dict[str, object]]:
        value = self.meta.get(key)
        loads = value.get("loads") if value is not None else None
        return list(loads) if isinstance(loads, list) else []

    def _observe(self, report: LoadReport) -> None:
        self.metrics.loads.inc()
        stages = report.stages.model_dump()
        for stage in STAGES:
            self.metrics.cold_start_stage_seconds.labels(stage).observe(stages[stage])
        self.metrics.load_throughput.observe(report.gbps * 1e9)  # base units: bytes/s
        if report.capture is not None:
            self.metrics.capture_replays.labels(
                "replayed" if report.capture.used else "missed"
            ).inc()
