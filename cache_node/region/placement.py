"""Which nodes own a blob: rendezvous (highest-random-weight) hashing over the live nodes.

Every node scores every blob with a hash of ``(blob, node_id)``; a blob's owners are the
``replicas`` nodes with the highest scores. Any node computes the same owners from the same
membership, with no coordination and no shared table. When a node leaves, only the blobs it
owned get a new owner (the next in their ranking); when one joins, it takes over only the blobs
it now outranks others on: about ``replicas / N`` of them, against nearly all of them with
``hash(blob) % N``. Pure functions, no I/O.
"""

from __future__ import annotations

import hashlib
import heapq
from collections.abc import Iterable

__all__ = ["DEFAULT_REPLICAS", "owners", "rank", "score"]

#: Owners per blob: one may die with no blob left without an owner peer.
DEFAULT_REPLICAS = 2


def score(blob: str, node_id: str) -> int:
    """The weight of ``node_id`` for ``blob``: 64 bits of a hash of both.

    blake2b rather than Python's ``hash()``, which is salted per process: every node must
    compute the same score. The separator keeps ``("ab", "c")`` and ``("a", "bc")`` apart.
    """
    digest = hashlib.blake2b(f"{blob}\x00{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rank(blob: str, node_ids: Iterable[str]) -> list[str]:
    """Every node in ``node_ids``, the best place for ``blob`` first (ties by node id)."""
    return sorted(set(node_ids), key=lambda node: (score(blob, node), node), reverse=True)


def owners(blob: str, node_ids: Iterable[str], *, replicas: int = DEFAULT_REPLICAS) -> list[str]:
    """The ``replicas`` owner nodes of ``blob`` among ``node_ids``, first owner first (fewer
    when fewer nodes are live)."""
    if replicas < 1:
        raise ValueError(f"replicas must be at least 1, not {replicas}")
    return heapq.nlargest(replicas, set(node_ids), key=lambda node: (score(blob, node), node))
