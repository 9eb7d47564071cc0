"""The eviction policy: plain data in, a frozen plan out. No I/O, no clock, no state.

The store executes a plan; this module only decides. Two questions are asked of it:

* :func:`plan` — a reservation of ``need_bytes`` does not fit: which pipelines go so that
  ``committed + reserved + need_bytes <= capacity``? Cold pipelines (not used within the hot
  window) go first, hot ones only when nothing colder is left, and the plan says so. If even every
  evictable pipeline together cannot make the room, the plan is unsatisfied and evicts *nothing*,
  so the caller answers ``insufficient_storage`` without throwing warm weights away for nothing.
* :func:`plan_watermark` — the periodic pass: usage is above the high watermark, so trim back to the
  low watermark, taking cold pipelines only (a hot pipeline is never evicted just for headroom).

Within a tier the order is least recently used, weighted by use count (see :class:`Limits`; with
``frequency_aging_s=None`` it is plain LRU). Rules both functions share:

* A pinned or leased pipeline is never a victim (a lease is held by a replica that is loading; an
  entry still being filled must be passed as leased too).
* A blob is freed only when every pipeline referencing it is evicted; sizes of blobs shared with a
  pipeline that stays are not counted.
* A victim whose eviction would free nothing (every blob it holds stays, shared with a pipeline
  that is kept) is dropped from the plan: forgetting it would cost a re-pull for no room.
* Ties are broken by pipeline id, so the same input always gives the same plan.

Why :func:`plan` frees only what the reservation needs, not down to the low watermark: every byte
evicted before it is needed is a byte that could still have been hit. ``benchmarks/eviction_sim.py``
measures it: trimming to the low watermark costs up to several points of hit ratio on sparse
traffic, so headroom is a separate, cold-only pass the node may run or not.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

VictimReason = Literal["cold", "hot-window", "watermark"]


@dataclass(frozen=True, slots=True)
class Entry:
    """One pipeline as the policy sees it.

    ``blobs`` maps the sha256 of each blob the pipeline holds *on disk* to its size in bytes (a
    blob not yet fetched is not listed). ``last_used_at`` is ``None`` until the first load; the
    entry's recency is then its registration time, so a pipeline just registered and pre-warmed
    counts as recent. ``loads`` is a use count the policy does not need; it is carried for
    variants that want a frequency signal.
    """

    pipeline_id: str
    blobs: Mapping[str, int]
    last_used_at: float | None
    registered_at: float
    pinned: bool = False
    leased: bool = False
    loads: int = 0

    def __post_init__(self) -> None:
        if any(size < 0 for size in self.blobs.values()):
            raise ValueError(f"{self.pipeline_id}: blob sizes must be >= 0")
        if self.loads < 0:
            raise ValueError(f"{self.pipeline_id}: loads must be >= 0")

    @property
    def last_touched_at(self) -> float:
        """The later of last use and registration: what recency is measured from."""
        if self.last_used_at is None:
            return self.registered_at
        return max(self.last_used_at, self.registered_at)

    @property
    def evictable(self) -> bool:
        """Neither pinned nor leased."""
        return not (self.pinned or self.leased)

    @property
    def size(self) -> int:
        """Bytes of all blobs this pipeline holds, shared ones included."""
        return sum(self.blobs.values())


@dataclass(frozen=True, slots=True)
class Limits:
    """Capacity in bytes, watermarks as fractions of it, the hot window, and the eviction order.

    Within each tier (cold, then hot) pipelines go in ascending order of their keep score,
    ``loads + last_touched_at / frequency_aging_s``: recency-weighted frequency, where one load is
    worth ``frequency_aging_s`` of recency. With every ``loads`` equal, or with
    ``frequency_aging_s=None``, that is exactly least recently used. The default (48 h) is what
    ``benchmarks/eviction_sim.py`` found better than plain LRU on every trace, in hit ratio and
    in bytes pulled from the origin.
    """

    capacity: int
    high_watermark: float = 0.90
    low_watermark: float = 0.80
    hot_window_s: float = 48 * 3600.0
    frequency_aging_s: float | None = 48 * 3600.0

    def __post_init__(self) -> None:
        if self.capacity < 0:
            raise ValueError("capacity must be >= 0")
        if not 0 < self.low_watermark <= self.high_watermark <= 1:
            raise ValueError("watermarks must satisfy 0 < low <= high <= 1")
        if self.hot_window_s < 0:
            raise ValueError("hot_window_s must be >= 0")
        if self.frequency_aging_s is not None and not self.frequency_aging_s > 0:
            raise ValueError("frequency_aging_s must be > 0 (or None for plain LRU)")

    @property
    def high_bytes(self) -> int:
        """Usage above which the watermark pass trims."""
        return int(self.capacity * self.high_watermark)

    @property
    def low_bytes(self) -> int:
        """Usage the watermark pass trims down to."""
        return int(self.capacity * self.low_watermark)


@dataclass(frozen=True, slots=True)
class Usage:
    """Bytes committed on disk, and bytes reserved by fills in flight (temp files included)."""

    committed: int
    reserved: int = 0

    def __post_init__(self) -> None:
        if self.committed < 0 or self.reserved < 0:
            raise ValueError("usage must be >= 0")

    @property
    def total(self) -> int:
        """Committed plus reserved."""
        return self.committed + self.reserved


@dataclass(frozen=True, slots=True)
class Victim:
    """One pipeline to evict.

    ``bytes_freed`` counts the blobs whose last reference goes with this victim, given the victims
    before it in the plan: a blob shared by several victims is counted once, on the last of them.
    ``reason`` is ``"cold"`` (outside the hot window, making room), ``"hot-window"`` (hot, taken
    because nothing colder was left) or ``"watermark"`` (cold, trimmed for headroom).
    """

    pipeline_id: str
    bytes_freed: int
    hot: bool
    reason: VictimReason


@dataclass(frozen=True, slots=True)
class EvictionPlan:
    """What to evict, in order, and what it frees.

    ``satisfied`` says whether the goal (room for the reservation, or the low watermark) is met once
    the victims are gone. ``used_hot`` says a pipeline inside the hot window had to go: the cache is
    too small for its working set.
    """

    victims: tuple[Victim, ...]
    bytes_freed: int
    satisfied: bool
    used_hot: bool
    reason: str

    @property
    def victim_ids(self) -> tuple[str, ...]:
        """The victims' pipeline ids, in eviction order."""
        return tuple(v.pipeline_id for v in self.victims)


def is_hot(entry: Entry, *, now: float, hot_window_s: float) -> bool:
    """Whether ``entry`` was used (or registered) within the hot window before ``now``."""
    return now - entry.last_touched_at < hot_window_s


def bytes_freed_by(entries: Iterable[Entry], victim_ids: Collection[str]) -> int:
    """Bytes freed if exactly ``victim_ids`` are evicted: blobs referenced by no other entry."""
    kept: set[str] = set()
    evicted: dict[str, int] = {}
    for entry in entries:
        if entry.pipeline_id in victim_ids:
            evicted.update(entry.blobs)
        else:
            kept.update(entry.blobs)
    return sum(size for blob, size in evicted.items() if blob not in kept)


def plan(
    entries: Iterable[Entry],
    *,
    need_bytes: int,
    usage: Usage,
    limits: Limits,
    now: float,
) -> EvictionPlan:
    """Make room for ``need_bytes`` more: evict until committed + reserved + need <= capacity.

    Cold pipelines go first, then hot ones (flagged), each tier in eviction order. If the room
    cannot be made even by evicting every evictable pipeline, the plan is unsatisfied and has no
    victims.
    ``need_bytes=0`` resolves an over-committed node (usage above capacity).
    """
    if need_bytes < 0:
        raise ValueError("need_bytes must be >= 0")
    pool = _Pool(entries)
    deficit = usage.total + need_bytes - limits.capacity
    if deficit <= 0:
        return EvictionPlan((), 0, True, False, "fits")
    ordered = _eviction_order(pool.entries, now=now, limits=limits)
    evictable = pool.freeable(e for e, _ in ordered)
    if evictable < deficit:
        reason = f"cannot make room: {deficit} bytes over capacity, {evictable} evictable"
        return EvictionPlan((), 0, False, False, reason)
    candidates: list[tuple[Entry, bool, VictimReason]] = [
        (e, hot, "hot-window" if hot else "cold") for e, hot in ordered
    ]
    victims = pool.select(candidates, target=deficit)
    freed = sum(v.bytes_freed for v in victims)
    used_hot = any(v.hot for v in victims)
    return EvictionPlan(
        victims,
        freed,
        True,
        used_hot,
        "made room, hot window used" if used_hot else "made room",
    )


def plan_watermark(
    entries: Iterable[Entry],
    *,
    usage: Usage,
    limits: Limits,
    now: float,
) -> EvictionPlan:
    """The periodic pass: above the high watermark, trim cold pipelines down to the low watermark.

    Hot pipelines are never taken for headroom. If the cold ones are not enough, the plan evicts
    them all (every byte below the high watermark is headroom gained) and is unsatisfied; an
    over-committed node is resolved by :func:`plan` with ``need_bytes=0``, which may take hot ones.
    """
    pool = _Pool(entries)
    if usage.total <= limits.high_bytes:
        return EvictionPlan((), 0, True, False, "below high watermark")
    target = usage.total - limits.low_bytes
    cold: list[tuple[Entry, bool, VictimReason]] = [
        (e, False, "watermark")
        for e, hot in _eviction_order(pool.entries, now=now, limits=limits)
        if not hot
    ]
    victims = pool.select(cold, target=target)
    freed = sum(v.bytes_freed for v in victims)
    satisfied = freed >= target
    reason = "trimmed to low watermark" if satisfied else "cold pipelines exhausted"
    return EvictionPlan(victims, freed, satisfied, False, reason)


def _eviction_order(
    entries: Sequence[Entry], *, now: float, limits: Limits
) -> list[tuple[Entry, bool]]:
    """Evictable entries with their hotness: cold before hot, lowest keep score first.

    Under plain LRU, tiering by a recency threshold does not change the order at all; the tiers
    exist so the plan can say when it reached into the hot window, so the watermark pass can stop
    at its edge, and so a frequently used pipeline that went quiet still goes before a hot one.
    """
    window, aging_s = limits.hot_window_s, limits.frequency_aging_s
    tagged = [(e, is_hot(e, now=now, hot_window_s=window)) for e in entries if e.evictable]
    if aging_s is None:
        tagged.sort(key=lambda item: (item[1], item[0].last_touched_at, item[0].pipeline_id))
    else:
        tagged.sort(
            key=lambda item: (
                item[1],
                item[0].loads + item[0].last_touched_at / aging_s,
                item[0].last_touched_at,
                item[0].pipeline_id,
            )
        )
    return tagged


class _Pool:
    """Reference counts of every blob across all entries, kept or not."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.entries: list[Entry] = list(entries)
        self.refs: dict[str, int] = {}
        self.sizes: dict[str, int] = {}
        seen: set[str] = set()
        for entry in self.entries:
            if entry.pipeline_id in seen:
                raise ValueError(f"duplicate pipeline id {entry.pipeline_id!r}")
            seen.add(entry.pipeline_id)
            for blob, size in entry.blobs.items():
                known = self.sizes.setdefault(blob, size)
                if known != size:
                    # Content-addressed: one digest has one size. Guessing would mis-account.
                    raise ValueError(f"blob {blob} listed with sizes {known} and {size}")
                self.refs[blob] = self.refs.get(blob, 0) + 1

    def freeable(self, candidates: Iterable[Entry]) -> int:
        """Bytes freed if every one of ``candidates`` went."""
        left = dict(self.refs)
        freed = 0
        for entry in candidates:
            for blob in entry.blobs:
                left[blob] -= 1
                if left[blob] == 0:
                    freed += self.sizes[blob]
        return freed

    def select(
        self, ordered: Sequence[tuple[Entry, bool, VictimReason]], *, target: int
    ) -> tuple[Victim, ...]:
        """Take candidates in order until ``target`` bytes are freed (or candidates run out).

        A candidate freeing nothing on its own may still be needed (it shares a blob with a later
        victim), so it is taken in turn and dropped at the end only if none of its blobs was freed.
        """
        left = dict(self.refs)
        taken: list[tuple[Entry, bool, VictimReason]] = []
        freed = 0
        for candidate in ordered:
            if freed >= target:
                break
            taken.append(candidate)
            for blob in candidate[0].blobs:
                left[blob] -= 1
                if left[blob] == 0:
                    freed += self.sizes[blob]
        last_taker: dict[str, int] = {}
        for index, (entry, _, _) in enumerate(taken):
            for blob in entry.blobs:
                last_taker[blob] = index
        victims: list[Victim] = []
        for index, (entry, hot, reason) in enumerate(taken):
            # Freed blobs are those whose count reached zero; each is credited to its last taker.
            # A taker none of whose blobs was freed would cost a re-pull for no room: dropped.
            if all(left[blob] > 0 for blob in entry.blobs):
                continue
            own = sum(
                self.sizes[blob]
                for blob in entry.blobs
                if left[blob] == 0 and last_taker[blob] == index
            )
            victims.append(Victim(entry.pipeline_id, own, hot, reason))
        return tuple(victims)
