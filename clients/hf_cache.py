"""``weightcache pull ID --hf-cache [DIR]``: a pipeline's models in the Hugging Face cache layout.

Each model lands where huggingface_hub looks for it, so ``from_pretrained("org/name")`` works
offline (``HF_HUB_OFFLINE=1``)::

    DIR/models--org--name/
        blobs/<sha256>                       the file's bytes, verified against its sha256
        snapshots/<revision>/<path>          a relative symlink to ../../blobs/<sha256>
        refs/main                            the revision (the commit the node resolved)

The repo id is the ``hf://`` source's ``org/name``; a model from S3 or a local directory is
filed under its model name. Files already present and verified are skipped; a file cut short
resumes from its ``.incomplete`` part with a range request, after re-hashing what is there.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from clients.client import Client
from clients.errors import ClientError, UsageError, raise_for_status

_BLOCK = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class PulledFile:
    """One file placed in the cache, and whether it was already there."""

    repo_id: str
    path: str
    size: int
    skipped: bool


def default_hf_cache() -> Path:
    """The hub cache huggingface_hub uses: ``HF_HUB_CACHE``, else ``HF_HOME/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def repo_id_of(source: str, model_name: str) -> str:
    """``org/name`` of an ``hf://`` source (without ``@revision``), else the model's name."""
    if source.startswith("hf://"):
        return source.removeprefix("hf://").split("@", 1)[0].strip("/")
    return model_name


def repo_folder(repo_id: str) -> str:
    """huggingface_hub's folder name for a model repo: ``models--org--name``."""
    return "models--" + "--".join(repo_id.split("/"))


def pull_to_hf_cache(
    client: Client,
    pipeline_id: str,
    *,
    cache_dir: Path | None = None,
    progress: Callable[[PulledFile], None] | None = None,
) -> list[PulledFile]:
    """Place every file of a warm pipeline in the HF cache layout under ``cache_dir``."""
    root = (cache_dir or default_hf_cache()).expanduser().resolve()
    status = client.status(pipeline_id)
    models = {m.name: m for m in status.models}
    pulled: list[PulledFile] = []
    for file in client.files(pipeline_id):
        model = models.get(file["model"])
        if model is None or not model.revision:
            raise ClientError(f"{pipeline_id}: model {file['model']!r} has no resolved revision")
        repo_id = repo_id_of(model.source, model.name)
        revision = _safe_component(model.revision, "revision")
        repo = root / _safe_component(repo_folder(repo_id), "repo id")
        relative = _safe_relative(file["path"])
        blob = repo / "blobs" / file["blob"]
        skipped = _verified(blob, file["blob"], file["size"])
        if not skipped:
            _download(client, file["blob"], file["size"], blob)
        link = repo / "snapshots" / revision / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        target = os.path.relpath(blob, link.parent)
        if not (link.is_symlink() and os.readlink(link) == target):
            temp = link.with_name(f".{link.name}.{os.getpid()}.link")
            temp.unlink(missing_ok=True)
            temp.symlink_to(target)
            os.replace(temp, link)
        refs = repo / "refs"
        refs.mkdir(parents=True, exist_ok=True)
        (refs / "main").write_text(model.revision)
        done = PulledFile(repo_id=repo_id, path=file["path"], size=file["size"], skipped=skipped)
        pulled.append(done)
        if progress is not None:
            progress(done)
    return pulled


def print_progress(file: PulledFile) -> None:
    """One line per file on stderr: what was fetched, what was already there."""
    what = "present" if file.skipped else "fetched"
    print(f"  {what} {file.repo_id}/{file.path} ({file.size:,} bytes)", file=sys.stderr)


def _safe_component(text: str, what: str) -> str:
    if not text or "/" in text or "\\" in text or text in (".", "..") or "\0" in text:
        raise UsageError(f"unsafe {what} {text!r} for a cache folder name")
    return text


def _safe_relative(path: str) -> Path:
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or any(p in ("..", ".") for p in parts):
        raise ClientError(f"unsafe path {path!r} in the pipeline's listing")
    return Path(*parts)


def _verified(blob: Path, sha256: str, size: int) -> bool:
    if not blob.is_file() or blob.is_symlink() or blob.stat().st_size != size:
        return False
    digest = hashlib.sha256()
    _feed_file(blob, digest)
    return digest.hexdigest() == sha256


def _feed_file(path: Path, digest: hashlib._Hash) -> int:
    """Feed every byte of ``path`` to ``digest``; returns how many there were."""
    fed = 0
    with open(path, "rb") as handle:
        while data := handle.read(_BLOCK):
            digest.update(data)
            fed += len(data)
    return fed


def _download(client: Client, sha256: str, size: int, blob: Path) -> None:
    """Fetch a blob into ``blob``, resuming its ``.incomplete`` part; verified before publish."""
    blob.parent.mkdir(parents=True, exist_ok=True)
    partial = blob.with_name(f"{blob.name}.incomplete")
    digest = hashlib.sha256()
    have = 0
    if partial.exists() and partial.stat().st_size <= size:
        have = _feed_file(partial, digest)
    else:
        partial.unlink(missing_ok=True)
    headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
    if have < size:
        with client.http.stream("GET", f"/v1/blobs/{sha256}", headers=headers) as response:
            raise_for_status(response)
            if headers and response.status_code != 206:  # the range was ignored: start over
                digest, have = hashlib.sha256(), 0
                partial.unlink(missing_ok=True)
            with open(partial, "ab") as out:
                for data in response.iter_raw(_BLOCK):
                    if have + len(data) > size:
                        raise ClientError(f"blob {sha256}: the node sent more than {size} bytes")
                    digest.update(data)
                    out.write(data)
                    have += len(data)
                out.flush()
                os.fsync(out.fileno())
    if have != size or digest.hexdigest() != sha256:
        partial.unlink(missing_ok=True)
        raise ClientError(f"blob {sha256}: received bytes do not match (size {have} of {size})")
    os.replace(partial, blob)
