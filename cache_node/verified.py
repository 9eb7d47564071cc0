"""Which origin objects this node has verified, per credential scope (I1, I7).

A digest an origin declares (an HF LFS oid, an S3 ``ChecksumSHA256``, a ``SHA256SUMS`` line, a git
sha1, an MD5 ETag) is a claim, not proof: anyone can publish a listing that names the sha256 of
another tenant's weights. So a stored blob is handed to an origin object only when bytes of *that
object*, read with *that credential scope*, were hashed to it here. This module keeps those facts:

    verified:<object key>  →  {"sha256": <blob>, "blob_created_at": <the blob's publish time>}

The object key is a digest of the credential scope and the object's identity: the source's
canonical location (without its revision), the file's path and size, and the digests the origin
declared; for a file with no declared sha256 also its version (the S3 ETag, else the snapshot's
revision: an HF commit or a local listing digest). A declared sha256 stands in for the version:
the fact then says "this path, declaring X, served bytes that hashed to X", which stays true for
a later commit declaring X again (so a new commit of a repo does not re-download its unchanged
weights), and shares nothing the origin had not already served in that scope.

A fact holds only while the very blob it was recorded for is stored: it names the blob's
publish time, so a blob deleted or quarantined and later published again (perhaps from
another origin) voids every fact about it; :meth:`VerifiedObjects.sweep` drops such facts from
the metadata. The facts live in the node's metadata, so they survive restarts.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cache_node.errors import InvalidInput
from cache_node.metadata import KeyValue
from cache_node.origins.base import OriginFile, parse_source
from cache_node.store import BlobRecord, BlobStore

__all__ = ["VerifiedObjects", "object_key"]

_PREFIX = "verified:"


def object_key(scope: str, source: str, revision: str, file: OriginFile) -> str:
    """The identity of one origin object as read with one credential scope (hex).

    ``source`` is canonicalised (``hf://org/repo@rev`` and ``hf://org/repo`` name one repo), so
    two pipelines of one model share the fact however they spell it. The scope itself is never
    stored: only this digest of it (scopes name credentials, if only by a digest).
    """
    ref = parse_source(source)
    version = "" if file.sha256 else (file.etag or revision)
    identity = "\n".join(
        [
            "object-v1",
            scope,
            f"{ref.scheme}://{ref.location.rstrip('/')}",  # "s3://b/m/" is "s3://b/m"
            file.path,
            str(file.size),
            version,
            file.sha256 or "",
            file.git_sha1 or "",
            file.md5 or "",
        ]
    )
    return hashlib.sha256(identity.encode()).hexdigest()


class VerifiedObjects:
    """The persistent "object read in this scope hashed to this blob" facts of one node."""

    def __init__(self, meta: KeyValue, store: BlobStore) -> None:
        self.meta = meta
        self.store = store

    def lookup(self, key: str) -> BlobRecord | None:
        """The stored blob that the object ``key`` was verified to be; None if there is none."""
        fact = self.meta.get(_PREFIX + key)
        if fact is None:
            return None
        blob = self._blob_of(fact)
        if blob is None:
            self.meta.delete(_PREFIX + key)  # the blob it named went away
        return blob

    def record(self, key: str, blob: BlobRecord) -> None:
        """Note that bytes of object ``key`` hashed to ``blob`` (call only after hashing them)."""
        self.meta.set(
            _PREFIX + key, {"sha256": blob.sha256, "blob_created_at": blob.created_at}
        )

    def _blob_of(self, fact: dict[str, Any]) -> BlobRecord | None:
        try:
            blob = self.store.get(str(fact.get("sha256", "")))
        except InvalidInput:  # not a sha256: a damaged fact proves nothing
            return None
        if blob is None or blob.created_at != fact.get("blob_created_at"):
            return None
        return blob

    def sweep(self) -> int:
        """Forget the facts whose blob is gone or was published again. Returns how many."""
        stale = []
        for name, fact in self.meta.scan(_PREFIX):
            if self._blob_of(fact) is None:
                stale.append(name)
        for name in stale:
            self.meta.delete(name)
        return len(stale)
