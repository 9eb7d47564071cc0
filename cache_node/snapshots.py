"""What an engine artifact of a pipeline was made from: each model's snapshot.

A model's snapshot is a sha256 over the content digests of its source files (the blob each
file is, with the file's name inside the model), so it changes when any byte of the model
changes and only then: never a location (a path, a bucket, a URL) and never a safetensors
header. A fine-tune with the base model's exact layout is another snapshot. Engine shard sets
(weights captures) are keyed by it; compile caches by the model's ``config.json`` blob, since
compiled code depends on the architecture, not on the weights.
"""

from __future__ import annotations

import hashlib

from cache_node.registry import CaptureRecord, ModelEntry, PipelineRecord

__all__ = ["config_blob", "current_captures", "model_snapshot", "snapshots"]

_VERSION = b"weightcache-snapshot-v1\n"


def model_snapshot(model: ModelEntry) -> str | None:
    """The model's snapshot (hex); None until every one of its files is a blob."""
    if not model.files or any(f.blob is None for f in model.files):
        return None
    lines = sorted(f"{f.blob} {f.path}" for f in model.files)
    return hashlib.sha256(_VERSION + "\n".join(lines).encode()).hexdigest()


def snapshots(record: PipelineRecord) -> dict[str, str]:
    """Every model's snapshot, by model name (models not yet fetched are left out)."""
    found = {m.name: model_snapshot(m) for m in record.models}
    return {name: digest for name, digest in found.items() if digest is not None}


def config_blob(model: ModelEntry) -> str | None:
    """The blob holding the model's ``config.json``, if it has one."""
    return next((f.blob for f in model.files if f.path == "config.json"), None)


def current_captures(record: PipelineRecord) -> dict[str, CaptureRecord]:
    """The captures of ``record`` still made for what its models are now: weights of the
    same snapshot, compile caches of the same ``config.json``, both for a TP size still
    registered. A re-registration that changed a model (or dropped a TP size) drops its
    captures and keeps the others'."""
    models = {m.name: m for m in record.models}
    kept = {}
    for capture_id, capture in record.captures.items():
        model = models.get(capture.key.model)
        if model is None or capture.key.tp_size not in record.spec.tp_sizes:
            continue  # a model or a TP size no longer served
        if capture.key.kind == "weights":
            valid = capture.key.snapshot == model_snapshot(model)
        else:
            valid = capture.key.config == config_blob(model)
        if valid:
            kept[capture_id] = capture
    return kept
