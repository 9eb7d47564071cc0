"""What the store records of each committed blob, and the one check of a blob's name.

A blob is named by its sha256 (64 lowercase hex digits, I8) and described by a
:class:`BlobRecord` under the metadata key ``blob:<sha256>``: its size and the chunk digests it
is checked against whenever it is served (I2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cache_node.errors import InvalidInput

__all__ = ["RECORD_PREFIX", "BlobRecord", "check_sha256", "is_hex", "record_key"]

#: Metadata keys of blob records: ``blob:<sha256>``.
RECORD_PREFIX = "blob:"
_HEX = frozenset("0123456789abcdef")


def is_hex(text: str) -> bool:
    """Whether ``text`` is made of lowercase hex digits only (empty counts as hex)."""
    return set(text) <= _HEX


def check_sha256(sha256: str) -> str:
    """Return ``sha256`` if it is 64 lowercase hex digits, else raise InvalidInput (I8)."""
    if len(sha256) != 64 or not is_hex(sha256):
        raise InvalidInput(f"not a sha256 digest: {sha256[:80]!r}", field="sha256")
    return sha256


def record_key(sha256: str) -> str:
    """The metadata key of blob ``sha256``'s record (the name is checked first)."""
    return f"{RECORD_PREFIX}{check_sha256(sha256)}"


@dataclass(frozen=True)
class BlobRecord:
    """Metadata of one committed blob."""

    sha256: str
    size: int
    chunk_size: int
    chunk_xxh3_128: tuple[str, ...]
    verified: bool  # whether the origin declared a digest that the bytes matched (I1)
    created_at: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "sha256": self.sha256,
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunk_xxh3_128": list(self.chunk_xxh3_128),
            "verified": self.verified,
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> BlobRecord:
        return cls(
            sha256=raw["sha256"],
            size=int(raw["size"]),
            chunk_size=int(raw["chunk_size"]),
            chunk_xxh3_128=tuple(raw["chunk_xxh3_128"]),
            verified=bool(raw["verified"]),
            created_at=float(raw["created_at"]),
        )
