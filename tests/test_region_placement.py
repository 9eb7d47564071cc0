"""Rendezvous placement: deterministic owners, and only ~replicas/N of the blobs move when a
node joins or leaves (measured over seeded random digests)."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from cache_node.region import DEFAULT_REPLICAS, owners, rank, score

NODES = [f"node-{i}" for i in range(10)]
BLOBS = 20_000


def digests(count: int, *, seed: int = 20240611) -> list[str]:
    rng = random.Random(seed)
    return [rng.randbytes(32).hex() for _ in range(count)]


@pytest.fixture(scope="module")
def blobs() -> list[str]:
    return digests(BLOBS)


def test_owners_are_the_best_ranked_distinct_nodes() -> None:
    blob = "ab" * 32
    ranked = rank(blob, NODES)
    assert sorted(ranked) == sorted(NODES)
    assert [score(blob, n) for n in ranked] == sorted((score(blob, n) for n in NODES), reverse=True)
    assert owners(blob, NODES) == ranked[:DEFAULT_REPLICAS] == ranked[:2]
    assert owners(blob, NODES, replicas=3) == ranked[:3]
    # the same answer whatever the order the membership was listed in, duplicates or not
    assert owners(blob, list(reversed(NODES)) + NODES[:3]) == owners(blob, NODES)
    assert owners(blob, ["only"]) == ["only"]
    assert owners(blob, []) == []
    with pytest.raises(ValueError, match="at least 1"):
        owners(blob, NODES, replicas=0)


def test_placement_is_pinned_across_processes_and_versions() -> None:
    """Every node must compute the same owners (no salted ``hash()``), and a new version must
    too: changing the score would move every blob of a region during a rolling upgrade."""
    assert score("0" * 64, "node-0") == 8371393784792676901
    assert owners("ab" * 32, NODES) == ["node-0", "node-1"]


def test_a_node_leaving_moves_only_its_own_blobs(blobs: list[str]) -> None:
    before = {b: owners(b, NODES) for b in blobs}
    leaving = "node-3"
    survivors = [n for n in NODES if n != leaving]
    moved = 0
    for blob in blobs:
        after = owners(blob, survivors)
        if leaving not in before[blob]:
            assert after == before[blob], "a blob the leaving node did not own changed owners"
            continue
        moved += 1
        # its other owner stays an owner; one new node fills the place of the one that left
        kept = [n for n in before[blob] if n != leaving]
        assert set(kept) <= set(after)
        assert len(set(after) - set(before[blob])) == 1
    expected = DEFAULT_REPLICAS / len(NODES)  # 0.2
    assert abs(moved / len(blobs) - expected) < 0.02, moved / len(blobs)


def test_a_node_joining_takes_only_the_blobs_it_now_owns(blobs: list[str]) -> None:
    before = {b: owners(b, NODES) for b in blobs}
    grown = [*NODES, "node-new"]
    moved = 0
    for blob in blobs:
        after = owners(blob, grown)
        if "node-new" not in after:
            assert after == before[blob], "a blob moved between two old nodes"
            continue
        moved += 1
        assert len(set(before[blob]) - set(after)) == 1  # it displaced exactly one owner
    expected = DEFAULT_REPLICAS / len(grown)  # 2/11
    assert abs(moved / len(blobs) - expected) < 0.02, moved / len(blobs)
    # what modulo placement would cost, for scale: nearly every blob moves
    modulo_moved = sum(int(b, 16) % len(NODES) != int(b, 16) % len(grown) for b in blobs)
    assert modulo_moved / len(blobs) > 0.8


def test_blobs_spread_evenly_over_the_nodes(blobs: list[str]) -> None:
    first = Counter(owners(b, NODES)[0] for b in blobs)
    mean = len(blobs) / len(NODES)
    assert set(first) == set(NODES)
    assert all(abs(count - mean) < 0.1 * mean for count in first.values()), first
