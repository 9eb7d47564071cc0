"""Which files of a source a pipeline keeps: include patterns and their defaults."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase

#: Weights as safetensors, configs, tokenizers, and the small files engines read beside them.
DEFAULT_INCLUDE: tuple[str, ...] = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.txt",
    "*.model",
    "*.tiktoken",
    "*.py",
    "*.jinja",
    "*.md",
)

#: Other weight formats: kept only when the source has no safetensors (they duplicate them).
DUPLICATE_WEIGHT_SUFFIXES: tuple[str, ...] = (".bin", ".pt", ".pth", ".h5", ".msgpack", ".gguf")
DUPLICATE_WEIGHT_INCLUDE: tuple[str, ...] = tuple(f"*{s}" for s in DUPLICATE_WEIGHT_SUFFIXES)


def _matches(path: str, patterns: Iterable[str]) -> bool:
    name = path.rsplit("/", 1)[-1]
    return any(fnmatchcase(path, p) or fnmatchcase(name, p) for p in patterns)


def select_files(paths: Sequence[str], include: Sequence[str] | None = None) -> list[str]:
    """The subset of ``paths`` to fetch, in their original order.

    With explicit ``include`` patterns, exactly the files matching one (by full path or base name).
    By default: :data:`DEFAULT_INCLUDE`, and the other weight formats only when there is no
    ``.safetensors`` file, so a repo that ships both is fetched once, not twice. Nested folders
    are kept; hidden files (``.gitattributes``) are skipped.
    """
    visible = [p for p in paths if not any(s.startswith(".") for s in p.split("/"))]
    if include:
        return [p for p in visible if _matches(p, include)]
    has_safetensors = any(p.endswith(".safetensors") for p in visible)
    patterns = DEFAULT_INCLUDE if has_safetensors else DEFAULT_INCLUDE + DUPLICATE_WEIGHT_INCLUDE
    return [p for p in visible if _matches(p, patterns)]


def without_excluded(paths: Sequence[str], exclude: Sequence[str] | None) -> list[str]:
    """``paths`` less those matching an ``exclude`` pattern (by full path or base name), as
    ``hf download --exclude`` applies them after ``--include``."""
    if not exclude:
        return list(paths)
    return [p for p in paths if not _matches(p, exclude)]
