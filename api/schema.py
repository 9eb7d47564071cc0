"""Wire models: the contract shared by the cache node and its clients.

Imports only pydantic, so the replica side (``loader``, ``clients``) can use it without FastAPI.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

# Identifiers become keys and never paths, but we still allow-list them (I8): lowercase or
# uppercase letters, digits, and ``._-`` inside, no leading dot, at most 128 characters.
_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256_PATTERN = re.compile(r"^[0-9a-f]{64}$")

PipelineState = Literal["cold", "warming", "warm", "failed", "evicted"]
ShardState = Literal["pending", "ready"]


def validate_identifier(value: str) -> str:
    """Return ``value`` if it is a safe pipeline or model identifier, else raise ValueError."""
    if not _ID_PATTERN.fullmatch(value) or ".." in value:
        raise ValueError(
            f"invalid identifier {value!r}: use 1-128 of A-Z a-z 0-9 . _ -, "
            "starting with a letter or digit, without '..'"
        )
    return value


def is_sha256(value: str) -> bool:
    """Whether ``value`` is a lowercase hex sha256 digest."""
    return bool(_SHA256_PATTERN.fullmatch(value))


def _sha256_field(value: str) -> str:
    if not is_sha256(value):
        raise ValueError(f"not a lowercase hex sha256 digest: {value[:80]!r}")
    return value


Identifier = Annotated[str, AfterValidator(validate_identifier)]
Sha256 = Annotated[str, AfterValidator(_sha256_field)]
#: A short word of a capture key: an engine name, version, dtype, quantisation or device kind.
KeyWord = Annotated[
    str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._+:-]*$")
]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSpec(_Wire):
    """One model of a pipeline: a name and where its files come from."""

    name: Identifier
    source: str = Field(min_length=1, max_length=1024, description="hf://, s3:// or file:// URL")
    revision: str | None = Field(default=None, max_length=256)
    include: list[str] | None = Field(default=None, max_length=64)
    exclude: list[str] | None = Field(
        default=None, max_length=64, description="patterns of files to skip, after include"
    )


class PipelineSpec(_Wire):
    """The body of ``PUT /v1/pipelines/{id}``."""

    models: list[ModelSpec] = Field(min_length=1, max_length=16)
    tp_sizes: list[int] = Field(default_factory=lambda: [1], min_length=1, max_length=8)
    pinned: bool = False


class ModelStatus(_Wire):
    name: str
    source: str
    revision: str | None
    files: int
    bytes_total: int


class ErrorInfo(_Wire):
    """Why a pipeline (or a re-registration attempt) failed, and what happens next.

    ``retry_at`` is when the node tries again on its own (transient failures only); ``None``
    means it will not: ``action`` then says what a person does. ``attempts`` counts the failed
    warms in a row of this spec.
    """

    code: str
    message: str
    retry_at: float | None = None
    attempts: int | None = None
    action: str | None = None


class AttemptStatus(_Wire):
    """A re-registration of a warm pipeline, filling (or failed) beside the warm version."""

    models: list[ModelStatus]
    tp_sizes: list[int]
    pinned: bool
    state: PipelineState
    progress: float
    registered_at: float
    error: ErrorInfo | None = None


class PipelineStatus(_Wire):
    """What a pipeline looks like on the wire."""

    id: str
    tenant: str
    state: PipelineState
    bytes_total: int
    bytes_cached: int
    progress: float
    models: list[ModelStatus]
    tp_sizes: list[int]
    shards: dict[str, ShardState]
    pinned: bool
    hot: bool
    last_used_at: float | None
    registered_at: float
    error: ErrorInfo | None = None
    evicted_reason: str | None = None
    unverified_files: int = 0
    active_leases: int = 0
    # A re-registration of a warm pipeline fills beside it; ``state`` stays that of the warm
    # version, which keeps serving until the new one is warm and takes its place.
    pending: AttemptStatus | None = None  # the new spec while it fills
    last_attempt: AttemptStatus | None = None  # the new spec after it failed (the old serves)
    #: Engine artifacts replicas uploaded (shard sets, compile caches); their bytes are in
    #: ``bytes_total`` and ``bytes_cached``, charged to the pipeline like its shard sets.
    captures: list[CaptureSummary] = Field(default_factory=list)


class PipelineList(_Wire):
    pipelines: list[PipelineStatus]


class ManifestFile(_Wire):
    """A file a rank needs that is not its weights (config, tokenizer)."""

    model: str
    path: str
    blob: str
    size: int


class ManifestTensor(_Wire):
    """One of this rank's tensors: ``length`` bytes at ``offset`` of blob ``blob``."""

    model: str
    name: str
    dtype: str
    shape: list[int]
    blob: str
    offset: int
    length: int


_NODE_URL = r"^https?://[^\s/?#]+(/[^\s?#]*)?$"
#: A cache node's base URL as the manifest names it: ``http(s)://host[:port][/prefix]``.
NodeUrl = Annotated[str, StringConstraints(pattern=_NODE_URL, max_length=2048)]


def is_node_url(text: str) -> bool:
    """Whether ``text`` is a :data:`NodeUrl` (what a manifest may name as a blob's holder)."""
    return len(text) <= 2048 and re.match(_NODE_URL, text) is not None


class ManifestBlob(_Wire):
    """Integrity data for a blob the manifest references (an extension of the contract).

    ``nodes``: the base URLs (a node's data plane where it has one, else its API) of the live
    nodes of the region that hold the blob, in the region's preferred (rendezvous) order. A
    replica spreads its range requests for the blob over them. Empty: the node that answered
    the manifest serves it (a single-node region).
    """

    sha256: str
    size: int
    chunk_size: int
    chunk_xxh3_128: list[str]
    nodes: list[NodeUrl] = Field(default_factory=list, max_length=256)


class Manifest(_Wire):
    pipeline: str
    tp_size: int
    rank: int
    bytes_total: int
    files: list[ManifestFile]
    tensors: list[ManifestTensor]
    blobs: list[ManifestBlob] = Field(default_factory=list)
    mode: Literal["full", "sharded"] = "full"
    #: Sharded mode: the rule the rank shards were cut by (``vllm-vocab-pad64``).
    layout: str | None = None
    #: Each model's snapshot: a sha256 over the content digests of its source files (what a
    #: weights capture is keyed by, ``CaptureKey.snapshot``).
    snapshots: dict[str, str] = Field(default_factory=dict)


class Lease(_Wire):
    lease_id: str
    expires_at: float


class NodeInfo(_Wire):
    node_id: str
    region: str
    capacity: int
    used: int
    reserved: int
    free: int
    version: str
    high_watermark: float
    low_watermark: float
    temp: int = 0  # idle partial transfers, kept to resume (not fills in flight)
    quarantined: int = 0
    in_flight: int = 0  # what fills in flight have written so far (part of ``reserved``)
    data_url: str | None = None  # where replicas read blobs fastest (the data plane), if any


class ErrorBody(_Wire):
    error: ErrorInfo


class PipelineFile(_Wire):
    """One origin file of a pipeline and the blob holding it (``GET .../files``)."""

    model: str
    path: str
    blob: str
    size: int
    verified: bool


class PipelineFiles(_Wire):
    files: list[PipelineFile]


class LoadStages(_Wire):
    """Seconds a replica's cold start spent in each stage (wall clock).

    ``verify`` is hashing time and may overlap ``stream``; ``total`` is the whole load.
    """

    lease: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    manifest: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    connect: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    stream: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    verify: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    total: float = Field(ge=0, allow_inf_nan=False)


class LoadReport(_Wire):
    """What one replica load did: the body of ``POST /v1/pipelines/{id}/loads`` (an extension
    of the contract). ``pipeline`` and ``at`` are filled in by the node when left out."""

    pipeline: Identifier | None = None
    tp_size: int = Field(default=1, ge=1, le=64)
    rank: int = Field(default=0, ge=0, le=63)
    device: str = Field(default="cpu", min_length=1, max_length=64)
    bytes: int = Field(ge=0)
    stages: LoadStages
    gbps: float = Field(ge=0, allow_inf_nan=False)
    at: float | None = Field(default=None, allow_inf_nan=False)
    source: Literal["local", "http"] = "http"
    capture: CaptureUse | None = None


class LoadList(_Wire):
    """``GET /v1/pipelines/{id}/loads`` and ``GET /v1/loads``: recent loads, newest first."""

    loads: list[LoadReport]


# ----------------------------------------------------------------------- captures
CaptureKind = Literal["weights", "compile_cache"]
#: What a weights capture holds: the parameters after vLLM's post-processing (``processed``:
#: a replay skips the weight loaders and the post-processing), or as the weight loaders left
#: them (``loaded``: a replay skips the weight loaders, then post-processes as usual).
CaptureStage = Literal["processed", "loaded"]
#: The safetensors metadata entries in which a weights capture says its stage, and which of
#: its tensors are module buffers (a JSON list of names).
CAPTURE_STAGE_METADATA = "weightcache.capture_stage"
CAPTURE_BUFFERS_METADATA = "weightcache.capture_buffers"
#: Prefixes every capture id: a new key format never meets captures of the old one.
_CAPTURE_ID_VERSION = b"weightcache-capture-v2\n"


class CaptureKey(_Wire):
    """What an engine artifact was made for; an engine uses one only when its own key is equal,
    field for field (the capture's id is a digest of the key: :func:`capture_id`).

    ``kind="weights"``: an engine shard set, one rank's final parameters, for the model's
    ``snapshot`` (a digest of the content of its source blobs, never of a path or a header),
    the engine and its version, TP size and rank, pipeline-parallel size and rank, dtype,
    quantisation, device kind and ``settings`` (a digest of the engine settings that change
    the parameters it ends with: the model config as the engine resolved it, overrides
    included, the context length, expert parallelism, the KV cache dtype).
    ``kind="compile_cache"``: the engine's compile cache, for the engine version, the model's
    ``config`` (the sha256 of its ``config.json``), TP size, device kind and ``settings`` (a
    digest of the engine settings that change compiled code).
    """

    kind: CaptureKind
    model: Identifier
    engine: KeyWord
    engine_version: KeyWord
    tp_size: int = Field(ge=1, le=64)
    device: KeyWord
    snapshot: Sha256 | None = None
    rank: int | None = Field(default=None, ge=0, le=63)
    pp_size: int | None = Field(default=None, ge=1, le=64)
    pp_rank: int | None = Field(default=None, ge=0, le=63)
    dtype: KeyWord | None = None
    quantization: KeyWord | None = None
    config: Sha256 | None = None
    settings: Sha256 | None = None

    @model_validator(mode="after")
    def _fields_of_its_kind(self) -> CaptureKey:
        weights = ("snapshot", "rank", "pp_size", "pp_rank", "dtype", "quantization")
        compiled = ("config",)
        own, foreign = (weights, compiled) if self.kind == "weights" else (compiled, weights)
        needed = (*own, "settings")
        missing = [name for name in needed if getattr(self, name) is None]
        extra = [name for name in foreign if getattr(self, name) is not None]
        if missing or extra:
            raise ValueError(
                f"a {self.kind} key needs {', '.join(needed)}"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + (f"; has no {', '.join(extra)}" if extra else "")
            )
        if self.rank is not None and self.rank >= self.tp_size:
            raise ValueError(f"rank {self.rank} is not below tp_size {self.tp_size}")
        if self.pp_rank is not None and self.pp_size is not None and self.pp_rank >= self.pp_size:
            raise ValueError(f"pp_rank {self.pp_rank} is not below pp_size {self.pp_size}")
        return self


def capture_id(key: CaptureKey) -> str:
    """The id of the capture made for ``key``: a sha256 of its fields (hex), the same on the
    node and in every replica, so a replica asks for exactly the capture its key names."""
    fields = key.model_dump(mode="json", exclude_none=True)
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(_CAPTURE_ID_VERSION + canonical).hexdigest()


class CaptureTensor(_Wire):
    """One tensor of a weights capture, by the engine's own parameter name: ``length`` bytes at
    ``offset`` of the capture's blob."""

    name: str
    dtype: str
    shape: list[int]
    offset: int
    length: int
    buffer: bool = False  # a module buffer, not a parameter


class CaptureSummary(_Wire):
    """A capture as a pipeline's status and ``GET .../captures`` list it."""

    id: str
    key: CaptureKey
    stage: CaptureStage | None = None
    bytes: int
    created_at: float


class CaptureInfo(CaptureSummary):
    """``GET /v1/pipelines/{id}/captures/{capture_id}``: where a capture's bytes are (its
    blob, with the chunk digests the node computed when it took the upload) and, for weights,
    its tensors."""

    blob: ManifestBlob
    tensors: list[CaptureTensor] = Field(default_factory=list)


class CaptureList(_Wire):
    captures: list[CaptureSummary]


class CaptureUse(_Wire):
    """Whether a replica's load replayed a capture (in its load report), and if not, why."""

    used: bool
    id: str | None = None
    stage: CaptureStage | None = None
    reason: str = Field(default="", max_length=2000)


class RegionNode(_Wire):
    """One live node of a region, as its last heartbeat described it."""

    node_id: str
    url: str  # its advertised API URL
    data_url: str | None = None  # its data plane, if it runs one
    state: str
    capacity: int
    used: int
    free: int
    last_heartbeat: float | None = None


class RegionPipeline(_Wire):
    """A pipeline the caller sees, and on how many live nodes it is whole."""

    tenant: str
    id: str
    #: Live nodes holding every blob of the pipeline (1 or 0 on a node outside a region).
    copies: int
    #: Their node ids.
    nodes: list[str] = Field(default_factory=list)


class RegionInfo(_Wire):
    """``GET /v1/region``: the region's live nodes and the caller's pipelines' copies (an
    extension of the contract). A node without ``--redis`` answers as a region of itself."""

    region: str
    #: False on a node without Redis; None when Redis cannot be reached now.
    connected: bool | None = True
    nodes: list[RegionNode]
    pipelines: list[RegionPipeline] = Field(default_factory=list)
