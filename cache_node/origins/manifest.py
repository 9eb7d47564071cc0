"""``SHA256SUMS`` manifests: the digests a publisher ships beside its files.

The format is what ``sha256sum`` writes: one ``<64 hex>  <relative path>`` per line (a ``*``
before the path marks binary mode and means nothing here). Paths are relative to the folder that
holds the manifest. Origins without digests of their own (S3 objects uploaded without a checksum,
local folders) use it to verify bytes at ingest (I1).
"""

from __future__ import annotations

import re

from cache_node.origins.base import safe_relative_path

#: The manifest's file name; it describes the files beside it and is never fetched as one of them.
MANIFEST_NAME = "SHA256SUMS"

_LINE = re.compile(r"(?P<digest>[0-9a-fA-F]{64}) [ *](?P<path>.+)")


def parse_sha256sums(text: str) -> dict[str, str]:
    """Map each relative path in ``text`` to its lowercase hex sha256.

    Blank lines and ``#`` comments are skipped; ``./`` before a path is dropped. Raises
    ``ValueError`` naming the line on anything else (a malformed line, an unsafe path, or one
    path listed twice with different digests), because a manifest that cannot be read fully
    must not be trusted partly.
    """
    digests: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.rstrip("\r")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            raise ValueError(f"{MANIFEST_NAME} line {number} is not '<sha256>  <path>'")
        path = match["path"]
        while path.startswith("./"):
            path = path[2:]
        try:
            safe_relative_path(path)
        except ValueError as exc:
            raise ValueError(f"{MANIFEST_NAME} line {number}: unsafe path {path!r}") from exc
        digest = match["digest"].lower()
        if digests.setdefault(path, digest) != digest:
            raise ValueError(f"{MANIFEST_NAME} line {number}: {path!r} listed twice, differently")
    return digests
