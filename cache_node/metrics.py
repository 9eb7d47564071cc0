"""Prometheus metrics of one node (I10), in a registry of its own so tests can run many nodes."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

if TYPE_CHECKING:
    from cache_node.blob_space import Usage

_STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class NodeMetrics:
    """Every counter, gauge and histogram a node exports on ``GET /metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.origin_fetches = Counter(
            "weightcache_origin_fetches", "Origin transfers by result", ["result"], registry=r
        )
        self.origin_bytes = Counter(
            "weightcache_origin_bytes", "Bytes received from origins", registry=r
        )
        self.peer_bytes = Counter(
            "weightcache_peer_bytes", "Bytes received from region peers (fills)", registry=r
        )
        self.region_fills = Counter(
            "weightcache_region_fills",
            "Fills by where the bytes came from (peer, origin, origin_without_region) or a "
            "peer that failed (peer_failed)",
            ["source"],
            registry=r,
        )
        self.region_reachable = Gauge(
            "weightcache_region_reachable",
            "1 while the region's Redis answers this node (0: unreachable, or not in a region)",
            registry=r,
        )
        self.origin_retries = Counter(
            "weightcache_origin_retries", "Retried origin requests", registry=r
        )
        self.coalesced_waiters = Counter(
            "weightcache_coalesced_waiters",
            "Requests that joined an origin transfer already in flight",
            registry=r,
        )
        self.cache_requests = Counter(
            "weightcache_cache_requests", "Blob requests by hit or miss", ["result"], registry=r
        )
        self.digest_mismatches = Counter(
            "weightcache_digest_mismatches", "Digest mismatches by stage", ["stage"], registry=r
        )
        self.insufficient_storage = Counter(
            "weightcache_insufficient_storage", "Fills refused for lack of space (507)", registry=r
        )
        self.disk_full = Counter(
            "weightcache_disk_full",
            "Times the data dir's filesystem ran out of space (ENOSPC or a full metadata store)",
            registry=r,
        )
        self.evictions = Counter(
            "weightcache_evictions", "Pipelines evicted, by reason", ["reason"], registry=r
        )
        self.evicted_bytes = Counter(
            "weightcache_evicted_bytes",
            "Bytes freed by eviction, by reason",
            ["reason"],
            registry=r,
        )
        self.bytes_served = Counter(
            "weightcache_bytes_served", "Blob bytes sent to clients", registry=r
        )
        self.bytes_by_state = Gauge(
            "weightcache_bytes", "Bytes on this node by state", ["state"], registry=r
        )
        self.pipelines_by_state = Gauge(
            "weightcache_pipelines", "Pipelines by state", ["state"], registry=r
        )
        self.warm_failures = Counter(
            "weightcache_warm_failures",
            "Warms (and re-registration attempts) that failed, by code",
            ["code"],
            registry=r,
        )
        self.warm_retries = Counter(
            "weightcache_warm_retries",
            "Automatic re-warms after a transient failure, by event (scheduled, started)",
            ["event"],
            registry=r,
        )
        self.invalid_checkpoints = Counter(
            "weightcache_invalid_checkpoints",
            "Fetched sources refused as not loadable, by code (invalid_checkpoint, no_weights)",
            ["code"],
            registry=r,
        )
        self.swaps = Counter(
            "weightcache_reregistration_swaps",
            "Re-registrations of a warm pipeline that became warm and took its place",
            registry=r,
        )
        self.loads = Counter("weightcache_loads", "Replica loads reported", registry=r)
        self.capture_uploads = Counter(
            "weightcache_capture_uploads",
            "Capture uploads (engine shard sets, compile caches) by kind and outcome (stored, "
            "or the error code that refused one)",
            ["kind", "outcome"],
            registry=r,
        )
        self.captures_dropped = Counter(
            "weightcache_captures_dropped",
            "Captures dropped by the node, by reason (failed_verification, missing_on_disk)",
            ["reason"],
            registry=r,
        )
        self.capture_replays = Counter(
            "weightcache_capture_replays",
            "Replica loads that reported on a capture, by result (replayed, or missed: the "
            "normal load ran)",
            ["result"],
            registry=r,
        )
        self.cold_start_stage_seconds = Histogram(
            "weightcache_cold_start_stage_seconds",
            "Replica cold-start time by stage",
            ["stage"],
            buckets=_STAGE_BUCKETS,
            registry=r,
        )
        self.load_throughput = Histogram(
            "weightcache_load_throughput_bytes_per_second",
            "Replica load throughput, bytes per second",
            buckets=tuple(gb * 1e9 for gb in (0.5, 1, 2, 5, 10, 20, 30, 40, 50, 60)),
            registry=r,
        )
        # What an on-call alerts on (prometheus-rules.yaml): the node's space in bytes.
        self.capacity_bytes = Gauge(
            "weightcache_capacity_bytes", "Bytes this node may use for blobs", registry=r
        )
        self.used_bytes = Gauge(
            "weightcache_used_bytes", "Bytes of committed blobs on this node", registry=r
        )
        self.reserved_bytes = Gauge(
            "weightcache_reserved_bytes", "Bytes reserved for fills in progress", registry=r
        )
        self.in_flight_bytes = Gauge(
            "weightcache_fill_bytes_in_flight",
            "Bytes fills in flight have written so far (a part of the reserved bytes)",
            registry=r,
        )
        self.free_bytes = Gauge(
            "weightcache_free_bytes",
            "Bytes a new fill can still reserve (capacity and the filesystem's free space)",
            registry=r,
        )
        self.blob_streams = Gauge(
            "weightcache_blob_streams", "API-port blob responses in flight", registry=r
        )
        self.blob_streams_refused = Counter(
            "weightcache_blob_streams_refused",
            "API-port blob requests refused at a stream limit, by limit (node, tenant)",
            ["limit"],
            registry=r,
        )

    def show(self, usage: Usage, states: Iterable[str]) -> None:
        """Set the byte gauges from ``usage`` and the pipeline gauges from their ``states``."""
        for state, value in (
            ("committed", usage.committed),
            ("reserved", usage.reserved),
            ("temp", usage.temp),
            ("quarantined", usage.quarantined),
        ):
            self.bytes_by_state.labels(state).set(value)
        self.capacity_bytes.set(usage.capacity)
        self.used_bytes.set(usage.committed)
        self.reserved_bytes.set(usage.reserved)
        self.in_flight_bytes.set(usage.in_flight)
        self.free_bytes.set(usage.free)
        counts = dict.fromkeys(("cold", "warming", "warm", "failed", "evicted"), 0)
        for state in states:
            counts[state] += 1
        for state, count in counts.items():
            self.pipelines_by_state.labels(state).set(count)
