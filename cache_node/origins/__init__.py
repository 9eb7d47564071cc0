"""Origins behind one protocol: ``open_origin`` picks the implementation for a source URL."""

from __future__ import annotations

from pathlib import Path

from api.schema import ModelSpec
from cache_node.errors import LocalSourceNotAllowed
from cache_node.origins.base import Origin, OriginFile, Snapshot, SourceRef, parse_source
from cache_node.settings import NodeSettings

__all__ = [
    "Origin",
    "OriginFile",
    "Snapshot",
    "SourceRef",
    "check_local_source",
    "open_origin",
    "parse_source",
    "validate_source",
]


def open_origin(model: ModelSpec, settings: NodeSettings, *, auth_enabled: bool) -> Origin:
    """The origin for one model of a pipeline; InvalidInput for a bad or forbidden source."""
    ref = validate_source(model, settings, auth_enabled=auth_enabled)
    if ref.scheme == "hf":
        from cache_node.origins.hf import HFOrigin

        return HFOrigin(ref, settings=settings.hf, include=model.include,
                        connect_timeout_s=settings.fetch.connect_timeout_s)
    if ref.scheme == "s3":
        from cache_node.origins.s3 import S3Origin

        return S3Origin(ref, settings=settings.s3, include=model.include,
                        connect_timeout_s=settings.fetch.connect_timeout_s)
    from cache_node.origins.local import LocalOrigin

    return LocalOrigin(ref, include=model.include)


def validate_source(
    model: ModelSpec, settings: NodeSettings, *, auth_enabled: bool
) -> SourceRef:
    """Parse a model's source and check it may be used here, opening nothing."""
    ref = parse_source(model.source, model.revision)
    if ref.scheme == "file":
        check_local_source(Path(ref.location), settings, auth_enabled=auth_enabled)
    return ref


def check_local_source(
    path: Path, settings: NodeSettings, *, auth_enabled: bool | None = None
) -> None:
    """A ``file://`` source opens the node's disk: only under ``--local-root`` dirs, whether or
    not auth is on (``auth_enabled`` is accepted for old callers and changes nothing)."""
    resolved = path.resolve()
    if resolved == settings.data_dir or resolved.is_relative_to(settings.data_dir):
        raise LocalSourceNotAllowed(
            "a local source may not point into the node's data dir",
            field="source",
            reason="data_dir",
        )
    if not settings.local_roots:
        raise LocalSourceNotAllowed(
            "file:// sources are refused: this node has no --local-root (serve --local-root DIR)",
            field="source",
            reason="no_local_root",
        )
    if not any(resolved.is_relative_to(root) for root in settings.local_roots):
        raise LocalSourceNotAllowed(
            "the local source is outside the --local-root dirs it may come from",
            field="source",
            reason="outside_local_roots",
        )
