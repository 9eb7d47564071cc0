"""Nothing is warm that cannot be loaded: a fetched model's weights checked before it is warm.

A model is loadable when

- its source holds weights at all: at least one ``*.safetensors`` file (checked on the file list
  right after resolve, before any origin byte: :func:`check_file_list`), and at least one tensor
  in them;
- every ``*.safetensors`` file has a header the strict parser (``loader.safetensors_format``)
  accepts, whose data spans pack the data section and end exactly at the end of the file;
- every safetensors index (``model.safetensors.index.json`` and its kin, e.g.
  ``diffusion_pytorch_model.safetensors.index.json``, in any folder) is a JSON object whose
  ``weight_map`` names only files the model holds, and each tensor it maps is in that file.

Other weight formats the include filter admits when a source has no safetensors (``.bin``,
``.pt``, ``.pth``, ``.h5``, ``.msgpack``, ``.gguf``) are **not supported**: the loader streams
safetensors only, so a source whose weights are only in those formats fails with ``no_weights``
(naming them) instead of being called warm. Such files beside safetensors are kept as plain files.

:func:`check_checkpoint` reads only headers and index files from the verified blobs on disk
(cheap, and nothing is fetched twice). Failures are ``InvalidCheckpoint`` (code
``invalid_checkpoint``, with the model, the file and what is wrong) or ``NoWeights``
(``no_weights``).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cache_node.errors import InvalidCheckpoint, NoWeights
from cache_node.origins.patterns import DUPLICATE_WEIGHT_SUFFIXES
from cache_node.registry import FileEntry, ModelEntry
from loader.errors import HeaderError
from loader.safetensors_format import SafetensorsHeader, read_header

__all__ = ["INDEX_SUFFIX", "WEIGHTS_SUFFIX", "check_checkpoint", "check_file_list"]

WEIGHTS_SUFFIX = ".safetensors"
INDEX_SUFFIX = ".safetensors.index.json"
#: Real indexes are a few MiB at most (one line per tensor); more is not an index.
_MAX_INDEX_BYTES = 64 * 1024 * 1024


def check_file_list(model: str, paths: Iterable[str]) -> None:
    """Raise ``NoWeights`` when a model's file list has no safetensors weights (before fetching)."""
    paths = list(paths)
    if any(p.endswith(WEIGHTS_SUFFIX) for p in paths):
        return
    other = sorted(p for p in paths if p.endswith(DUPLICATE_WEIGHT_SUFFIXES))
    if other:
        shown = ", ".join(other[:3]) + (f" and {len(other) - 3} more" if len(other) > 3 else "")
        raise NoWeights(
            f"model {model!r} has weights only in formats weightcache does not load ({shown}); "
            "it loads safetensors: convert the checkpoint or point at a safetensors revision",
            model=model,
            unsupported=other[:16],
        )
    raise NoWeights(
        f"model {model!r}: the source holds no weights (no .safetensors file among "
        f"{len(paths)} files)",
        model=model,
    )


#: ``verify(sha256, header_only)``: check a blob's chunk digests (only its safetensors header's
#: with ``header_only``) before its bytes are trusted; raises ``IntegrityError`` on a mismatch.
Verify = Callable[[str, bool], None]


def check_checkpoint(
    models: Iterable[ModelEntry],
    blob_path: Callable[[str], Path],
    *,
    verify: Verify | None = None,
) -> None:
    """Check every model's weights and indexes from its blobs on disk (headers only).

    ``blob_path(sha256)`` is where a committed blob lives; ``verify`` checks the bytes read
    against their digests first (a byte flipped on disk is an ``IntegrityError`` and a re-fetch,
    not a verdict on the checkpoint). Raises ``InvalidCheckpoint`` or ``NoWeights`` for the
    first model that cannot be loaded.
    """
    def path_of(sha256: str, header_only: bool) -> Path:
        if verify is not None:
            verify(sha256, header_only)
        return blob_path(sha256)

    for model in models:
        _check_model(model, path_of)


_PathOf = Callable[[str, bool], Path]


def _check_model(model: ModelEntry, blob_path: _PathOf) -> None:
    check_file_list(model.name, (f.path for f in model.files))
    by_path = {f.path: f for f in model.files}
    headers: dict[str, SafetensorsHeader] = {}
    for file in model.files:
        if file.path.endswith(WEIGHTS_SUFFIX):
            headers[file.path] = _header(model.name, file, blob_path)
    if not any(header.tensors for header in headers.values()):
        raise NoWeights(
            f"model {model.name!r}: its {len(headers)} safetensors file(s) hold no tensors",
            model=model.name,
        )
    for file in model.files:
        if file.path.endswith(INDEX_SUFFIX):
            _check_index(model.name, file, blob_path, by_path, headers)


def _header(model: str, file: FileEntry, blob_path: _PathOf) -> SafetensorsHeader:
    path = blob_path(_blob(model, file), True)
    try:
        return read_header(path)
    except HeaderError as exc:
        raise InvalidCheckpoint(
            f"model {model!r}: {file.path} is not a valid safetensors file: {exc}",
            model=model,
            path=file.path,
        ) from None
    except OSError as exc:
        raise InvalidCheckpoint(
            f"model {model!r}: {file.path} cannot be read: {exc.strerror or exc}",
            model=model,
            path=file.path,
        ) from None


def _check_index(
    model: str,
    file: FileEntry,
    blob_path: _PathOf,
    by_path: dict[str, FileEntry],
    headers: dict[str, SafetensorsHeader],
) -> None:
    def invalid(what: str, **details: Any) -> InvalidCheckpoint:
        return InvalidCheckpoint(
            f"model {model!r}: index {file.path}: {what}", model=model, path=file.path, **details
        )

    if file.size > _MAX_INDEX_BYTES:
        raise invalid(f"{file.size} bytes is too large for an index")
    blob_file = blob_path(_blob(model, file), False)
    try:
        document = json.loads(blob_file.read_bytes())
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise invalid(f"not JSON: {exc}") from None
    except OSError as exc:
        raise invalid(f"cannot be read: {exc.strerror or exc}") from None
    weight_map = document.get("weight_map") if isinstance(document, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise invalid("no weight_map object mapping tensor names to files")
    folder = posixpath.dirname(file.path)
    names: dict[str, set[str] | None] = {}  # file named by the index → its tensor names
    for tensor, target in weight_map.items():
        if not isinstance(target, str) or not target:
            raise invalid(f"tensor {tensor!r} maps to {target!r}, not a file name")
        path = posixpath.normpath(posixpath.join(folder, target))
        if path.startswith("../") or path == ".." or posixpath.isabs(target):
            raise invalid(f"tensor {tensor!r} maps to {target!r}, outside the model")
        if path not in names:
            if path not in by_path:
                raise invalid(
                    f"names {target!r}, which the model does not hold (missing at the source, "
                    "or left out by the include patterns)",
                    missing=target,
                )
            header = headers.get(path)
            names[path] = None if header is None else {t.name for t in header.tensors}
        held = names[path]
        if held is None:
            raise invalid(f"maps tensor {tensor!r} to {target!r}, which is not safetensors")
        if tensor not in held:
            raise invalid(f"maps tensor {tensor!r} to {target!r}, which does not hold it",
                          missing_tensor=tensor)


def _blob(model: str, file: FileEntry) -> str:
    if file.blob is None:
        raise InvalidCheckpoint(
            f"model {model!r}: {file.path} was not fetched", model=model, path=file.path
        )
    return file.blob
