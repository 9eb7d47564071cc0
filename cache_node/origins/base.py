"""The origin protocol: resolve a source to an immutable snapshot, then read byte ranges.

Every origin (Hugging Face, S3, a local directory) implements :class:`Origin`. The fetcher
(``cache_node.fetch``, one transfer in ``cache_node.transfer``) owns parallelism, retries,
hashing and publishing; an origin only speaks its protocol and translates its errors into
``cache_node.errors.OriginError`` and kin.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Protocol
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict

from cache_node.errors import InvalidInput


class OriginFile(BaseModel):
    """One file of a snapshot, with whatever digests the origin declares (the registry's
    ``FileEntry`` is this, plus the blob that holds it)."""

    model_config = ConfigDict(frozen=True)

    path: str  # relative POSIX path inside the snapshot, validated by ``safe_relative_path``
    size: int
    sha256: str | None = None  # HF LFS sha256, S3 ChecksumSHA256, or a manifest's sha256
    git_sha1: str | None = None  # HF small (non-LFS) files: the git blob sha1
    md5: str | None = None  # S3 single-part ETag
    etag: str | None = None  # pins ranged reads to this version (S3 If-Match)

    @property
    def has_digest(self) -> bool:
        """Whether the origin declared anything the bytes can be checked against (I1)."""
        return bool(self.sha256 or self.git_sha1 or self.md5)


@dataclass(frozen=True)
class Snapshot:
    """An immutable view of a source: its revision and files (I9)."""

    source: str
    revision: str  # HF commit sha, S3 "etags:<digest of the listing>" or VersionIds, local digest
    files: tuple[OriginFile, ...] = field(default_factory=tuple)

    @property
    def bytes_total(self) -> int:
        return sum(f.size for f in self.files)


class Origin(Protocol):
    """What the fetcher needs from an origin."""

    #: Identifies the credentials used, so single flight never shares a transfer across scopes (I4).
    scope: str

    async def resolve(self) -> Snapshot:
        """Pin the source to an immutable revision and list its selected files."""
        ...

    def read_range(self, file: OriginFile, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of ``file`` in order.

        May yield fewer bytes than asked and stop (the fetcher resumes from there), but never
        bytes from outside the range. Raises ``OriginError`` (``retryable`` set) on failure.
        """
        ...

    def pin(self, snapshot: Snapshot) -> None:
        """Adopt a snapshot that another origin of the same source and scope resolved."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


@dataclass(frozen=True)
class SourceRef:
    """A parsed source URL: ``hf://org/repo@rev``, ``s3://bucket/prefix``, ``file:///abs/path``."""

    scheme: str
    location: str  # hf: "org/repo"; s3: "bucket/prefix"; file: absolute path
    revision: str | None = None


def parse_source(source: str, revision: str | None = None) -> SourceRef:
    """Parse and validate a source URL; ``revision`` (from the spec) overrides ``@rev``."""
    if "\x00" in source or any(ord(c) < 32 for c in source):
        raise InvalidInput("source contains control characters", field="source")
    parts = urlsplit(source)
    scheme = parts.scheme.lower()
    if scheme == "hf":
        location = f"{parts.netloc}{parts.path}".strip("/")
        ref_revision = None
        if "@" in location:
            location, ref_revision = location.split("@", 1)
        segments = location.split("/")
        if len(segments) not in (1, 2) or not all(_safe_segment(s) for s in segments):
            raise InvalidInput(f"invalid Hugging Face repo in {source!r}", field="source")
        rev = revision or ref_revision
        if rev is not None and not _safe_revision(rev):
            raise InvalidInput(f"invalid revision {rev!r}", field="revision")
        return SourceRef("hf", location, rev)
    if scheme == "s3":
        bucket = parts.netloc
        prefix = unquote(parts.path).lstrip("/")
        if not bucket or not all(c.isalnum() or c in ".-_" for c in bucket):
            raise InvalidInput(f"invalid S3 bucket in {source!r}", field="source")
        if any(seg in ("..", ".") for seg in prefix.split("/")):
            raise InvalidInput(f"invalid S3 prefix in {source!r}", field="source")
        if revision is not None and not _safe_revision(revision):
            raise InvalidInput(f"invalid revision {revision!r}", field="revision")
        return SourceRef("s3", f"{bucket}/{prefix}", revision)
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidInput("file:// sources must be local absolute paths", field="source")
        path = unquote(parts.path)
        if not path.startswith("/") or any(seg == ".." for seg in path.split("/")):
            raise InvalidInput(f"invalid local path in {source!r}", field="source")
        return SourceRef("file", path, revision)
    raise InvalidInput(
        f"unsupported source {source!r}: use hf://ORG/REPO[@REV], s3://BUCKET/PREFIX or "
        "file:///ABS/PATH",
        field="source",
    )


def safe_relative_path(path: str) -> str:
    """Return ``path`` if it is a safe relative POSIX path inside a snapshot, else raise."""
    segments = path.split("/")
    if (
        not path
        or path.startswith("/")
        or "\\" in path
        or "\x00" in path
        or any(s in ("", ".", "..") for s in segments)
        or len(path) > 1024
    ):
        raise InvalidInput(f"unsafe file path {path!r} in the origin's listing", field="path")
    return path


def _safe_segment(segment: str) -> bool:
    return bool(segment) and segment not in (".", "..") and all(
        c.isalnum() or c in "._-" for c in segment
    )


def _safe_revision(revision: str) -> bool:
    return (
        0 < len(revision) <= 256
        and ".." not in revision
        and all(c.isalnum() or c in "._-/:" for c in revision)
        and not revision.startswith("/")
    )
