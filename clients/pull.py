"""``weightcache pull``: a pipeline's files in a local directory, each one verified."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from clients.client import Client
from clients.errors import ClientError, raise_for_status

__all__ = ["fetch_file", "pull"]

_BLOCK = 8 * 1024 * 1024


def pull(client: Client, pipeline_id: str, *, dest: str | Path) -> list[Path]:
    """Write every file of a warm pipeline under ``dest`` (``dest/<model>/<path>`` when there
    are several models), checking each against its sha256 blob name; returns the paths."""
    root = Path(dest).resolve()
    files = client.files(pipeline_id)
    several = len({f["model"] for f in files}) > 1
    written = []
    for file in files:
        relative = Path(file["model"], file["path"]) if several else Path(file["path"])
        written.append(fetch_file(client, root, relative, blob=file["blob"], size=file["size"]))
    return written


def fetch_file(client: Client, root: Path, relative: str | Path, *, blob: str, size: int) -> Path:
    """Write blob ``blob`` at ``root / relative`` and return that path.

    The bytes go to a temp file beside it, renamed over the target only once their sha256 is
    the blob's name and their length ``size`` (``OSError`` otherwise). A ``relative`` that
    would land outside ``root`` (``..``, an absolute path) is a :class:`ClientError`.
    """
    target = (root / relative).resolve()
    if not target.is_relative_to(root.resolve()):
        raise ClientError(f"unsafe path {str(relative)!r} in the pipeline's listing")
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    digest = hashlib.sha256()
    with client.http.stream("GET", f"/v1/blobs/{blob}") as response:
        raise_for_status(response)
        with open(temp, "wb") as out:
            for data in response.iter_raw(_BLOCK):
                digest.update(data)
                out.write(data)
    if digest.hexdigest() != blob or temp.stat().st_size != size:
        temp.unlink(missing_ok=True)
        raise OSError(f"{relative}: received bytes do not match blob {blob}")
    os.replace(temp, target)
    return target
