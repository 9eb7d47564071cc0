"""One typed settings object per node process: validated at start, injected everywhere.

Environment variables are read here and nowhere else (prefix ``WEIGHTCACHE_``), plus the
standard ones the origins document (``HF_TOKEN``, ``HF_ENDPOINT``, ``AWS_*``), and never written.
"""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path
from typing import Annotated

from pydantic import BeforeValidator, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from cache_node.sizes import parse_size

ByteSize = Annotated[int, BeforeValidator(parse_size)]

DEFAULT_PORT = 8470


def _default_data_dir() -> Path:
    return Path.home() / ".cache" / "weightcache"


class S3Settings(BaseSettings):
    """Endpoint and credentials for ``s3://`` sources; unset fields fall back to ``AWS_*``."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_S3_", extra="forbid")

    endpoint_url: str | None = None
    access_key_id: str | None = None
    secret_access_key: SecretStr | None = None
    session_token: SecretStr | None = None
    profile: str | None = None  # a named profile of the AWS config files, instead of keys
    region: str | None = None

    @model_validator(mode="after")
    def _standard_aws_variables(self) -> S3Settings:
        env = os.environ
        if self.endpoint_url is None:
            self.endpoint_url = env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL")
        if self.access_key_id is None:
            self.access_key_id = env.get("AWS_ACCESS_KEY_ID")
        if self.secret_access_key is None and env.get("AWS_SECRET_ACCESS_KEY"):
            self.secret_access_key = SecretStr(env["AWS_SECRET_ACCESS_KEY"])
        if self.session_token is None and env.get("AWS_SESSION_TOKEN"):
            self.session_token = SecretStr(env["AWS_SESSION_TOKEN"])
        if self.region is None:
            self.region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1"
        return self


class HFSettings(BaseSettings):
    """Hub URL and token for ``hf://`` sources; unset fields fall back to ``HF_*``."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_HF_", extra="forbid")

    endpoint: str | None = None
    token: SecretStr | None = None

    @model_validator(mode="after")
    def _standard_hf_variables(self) -> HFSettings:
        if self.endpoint is None:
            self.endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
        if self.token is None and os.environ.get("HF_TOKEN"):
            self.token = SecretStr(os.environ["HF_TOKEN"])
        return self


class FetchSettings(BaseSettings):
    """How origin transfers behave: parallelism, retries, stall detection."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_FETCH_", extra="forbid")

    part_size: ByteSize = 16 * 1024**2
    concurrency: int = Field(default=8, ge=1, le=256)
    max_attempts: int = Field(default=5, ge=1, le=50)
    backoff_base_s: float = Field(default=0.5, gt=0)
    backoff_cap_s: float = Field(default=20.0, gt=0)
    retry_budget_s: float = Field(default=60.0, gt=0)
    stall_timeout_s: float = Field(default=30.0, gt=0)
    connect_timeout_s: float = Field(default=10.0, gt=0)
    negative_cache_s: float = Field(default=30.0, ge=0)


class RetrySettings(BaseSettings):
    """Automatic re-warms after a transient failure: ``base_s`` doubling up to ``cap_s``."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_RETRY_", extra="forbid")

    enabled: bool = True
    base_s: float = Field(default=30.0, gt=0)
    cap_s: float = Field(default=3600.0, gt=0)
    # How often the scheduler looks at the registry even when nothing is due (another node of
    # the region, or an operator, may have changed it).
    poll_s: float = Field(default=60.0, gt=0)


class EvictionSettings(BaseSettings):
    """When and how far the node evicts."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_EVICTION_", extra="forbid")

    # The background trim (above high, down to low) is off by default: the eviction simulator
    # shows that freeing bytes before they are needed costs hits on sparse traces
    # (benchmarks/results/eviction_sim.md). Eviction on demand always runs.
    high_watermark: float = Field(default=1.0, gt=0, le=1)
    low_watermark: float = Field(default=1.0, gt=0, le=1)
    hot_window_s: float = Field(default=48 * 3600, ge=0)
    interval_s: float = Field(default=30.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> EvictionSettings:
        if self.low_watermark > self.high_watermark:
            raise ValueError("low_watermark must not exceed high_watermark")
        return self


class LimitSettings(BaseSettings):
    """What the tenants together, and each one alone, may hold at once on a node."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_LIMITS_", extra="forbid")

    blob_streams: int = Field(default=256, ge=1)  # API-port blob responses in flight
    blob_streams_per_tenant: int = Field(default=64, ge=1)
    # What one API-port stream reads ahead of its client, at most (its memory, twice over).
    blob_stream_piece: ByteSize = 256 * 1024
    leases_per_tenant: int = Field(default=1024, ge=1)
    retry_after_s: float = Field(default=1.0, gt=0)  # the Retry-After of a refused stream


class CaptureSettings(BaseSettings):
    """What replicas may upload as engine artifacts of a pipeline (``cache_node.captures``)."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_CAPTURES_", extra="forbid")

    enabled: bool = True
    #: An engine shard set holds one rank's parameters: at most this many times the model's
    #: bytes (vocab padding, copied KV heads, a dtype or a layout post-processing changed) ...
    weights_factor: float = Field(default=2.0, gt=0, le=16)
    #: ... plus this much (the safetensors header, small models' padding).
    weights_slack: ByteSize = 64 * 1024**2
    #: An engine compile cache (a tarball of the engine's compiled code) at most this big.
    compile_cache_max: ByteSize = 2 * 1024**3
    #: Captures kept per slot (a model's rank at a TP size for weights; a model at a TP size
    #: for compile caches): a new one past this drops the oldest (an engine upgrade, other
    #: settings), so a pipeline's captures stay bounded however many keys replicas try.
    per_slot: int = Field(default=2, ge=1, le=16)
    #: Uploads one tenant may have open at once (each holds a reservation of its size) ...
    uploads_per_tenant: int = Field(default=8, ge=1, le=1024)
    #: ... and how long an upload may send nothing before it is dropped (408).
    upload_idle_s: float = Field(default=60.0, gt=0)


class DataPlaneSettings(BaseSettings):
    """How ``serve`` supervises its data-plane workers."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_DATA_PLANE_", extra="forbid")

    restart_backoff_s: float = Field(default=0.5, gt=0)  # first restart delay, then doubled
    restart_backoff_cap_s: float = Field(default=30.0, gt=0)
    healthy_after_s: float = Field(default=30.0, gt=0)  # up this long: the backoff resets
    check_interval_s: float = Field(default=0.2, gt=0)


class RegionSettings(BaseSettings):
    """How a node takes part in a multi-node region (``redis_url`` set): ``cache_node.region``.

    The secret authenticates peer traffic (``cache_node.region.peer_auth``); every node of a
    region has the same one. Heartbeats renew a membership record that expires after
    ``heartbeat_ttl_s``; at least two beats fit in a TTL, so one late beat costs nothing.
    """

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_REGION_", extra="forbid")

    advertise_url: str | None = None  # how peers and replicas reach this node (--advertise)
    secret: SecretStr | None = None
    replicas: int = Field(default=2, ge=1, le=16)  # owner nodes per blob (rendezvous)
    heartbeat_interval_s: float = Field(default=5.0, gt=0)
    heartbeat_ttl_s: float = Field(default=15.0, gt=0)
    flight_lease_ttl_s: float = Field(default=30.0, gt=0)  # a dead leader blocks this long
    flight_wait_s: float = Field(default=900.0, gt=0)  # a waiter gives up after this
    redis_timeout_s: float = Field(default=2.0, gt=0)
    #: How often a node reconciles its pipelines with the region's catalogue, besides the
    #: nudge every change publishes (a nudge can be missed while Redis is away).
    reconcile_interval_s: float = Field(default=10.0, gt=0)
    #: How long a peer's blob response may stay silent before the fill moves to the next one.
    peer_timeout_s: float = Field(default=10.0, gt=0)

    @model_validator(mode="after")
    def _two_beats_per_ttl(self) -> RegionSettings:
        if self.heartbeat_interval_s * 2 > self.heartbeat_ttl_s:
            raise ValueError("heartbeat_interval_s must be at most half of heartbeat_ttl_s")
        return self


class NodeSettings(BaseSettings):
    """Everything one cache node needs to run."""

    model_config = SettingsConfigDict(env_prefix="WEIGHTCACHE_", extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir)
    host: str = "127.0.0.1"
    port: int = Field(default=DEFAULT_PORT, ge=0, le=65535)
    capacity: ByteSize = 100 * 1024**3
    #: Pre-allocated on the data dir's filesystem (at most 1/16 of it) and never promised to a
    #: fill: the room the metadata store needs to record a failure or a deletion once the disk
    #: is full (0: none, and a fill that meets a full disk may then be left unrecorded).
    disk_headroom: ByteSize = 16 * 1024**2
    region: str = "local"
    node_id: str = Field(default_factory=lambda: f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}")
    tokens_file: Path | None = None
    #: How often every process of the node looks for a new version of the tokens file (a
    #: ``stat``; the file is read only when it changed). SIGHUP makes them read it at once.
    tokens_check_interval_s: float = Field(default=1.0, gt=0)
    local_roots: list[Path] = Field(default_factory=list)
    redis_url: str | None = None
    lease_ttl_s: float = Field(default=300.0, gt=0)
    data_url: str | None = None  # the data plane's base URL, advertised to replicas
    s3: S3Settings = Field(default_factory=S3Settings)
    hf: HFSettings = Field(default_factory=HFSettings)
    fetch: FetchSettings = Field(default_factory=FetchSettings)
    eviction: EvictionSettings = Field(default_factory=EvictionSettings)
    retry: RetrySettings = Field(default_factory=RetrySettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    data_plane: DataPlaneSettings = Field(default_factory=DataPlaneSettings)
    regional: RegionSettings = Field(default_factory=RegionSettings)
    captures: CaptureSettings = Field(default_factory=CaptureSettings)

    @model_validator(mode="after")
    def _resolve_paths(self) -> NodeSettings:
        self.data_dir = self.data_dir.expanduser().resolve()
        self.local_roots = [p.expanduser().resolve() for p in self.local_roots]
        return self

    def load_tokens(self) -> dict[str, str] | None:
        """The token → tenant map, or None when auth is off. Raises ValueError on a bad file.

        The file may also carry per-tenant policies (``cache_node.access``); this is only the
        map, which is all a data-plane worker needs.
        """
        if self.tokens_file is None:
            return None
        from cache_node.access import load_access  # it imports this module

        return load_access(Path(self.tokens_file)).tokens
