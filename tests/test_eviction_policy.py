"""The eviction policy on plain data: unit cases, then properties over random entries."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import eviction
from eviction import Entry, Limits, Usage, bytes_freed_by, plan, plan_watermark

HOUR = 3600.0
NOW = 1_000_000.0
GB = 10**9


def entry(
    pid: str,
    size: int = GB,
    *,
    age_h: float = 100.0,
    blobs: dict[str, int] | None = None,
    pinned: bool = False,
    leased: bool = False,
    loads: int = 0,
) -> Entry:
    """A pipeline last used ``age_h`` hours before NOW, holding one blob of its own by default."""
    return Entry(
        pipeline_id=pid,
        blobs=blobs if blobs is not None else {f"sha-{pid}": size},
        last_used_at=NOW - age_h * HOUR,
        registered_at=0.0,
        pinned=pinned,
        leased=leased,
        loads=loads,
    )


def total(entries: list[Entry]) -> int:
    merged: dict[str, int] = {}
    for e in entries:
        merged.update(e.blobs)
    return sum(merged.values())


def limits(capacity: int, **kwargs: float | None) -> Limits:
    return Limits(capacity=capacity, **kwargs)  # type: ignore[arg-type]


def test_public_api_is_pinned() -> None:
    assert sorted(eviction.__all__) == [
        "Entry",
        "EvictionPlan",
        "Limits",
        "Usage",
        "Victim",
        "VictimReason",
        "bytes_freed_by",
        "is_hot",
        "plan",
        "plan_watermark",
    ]
    for name in eviction.__all__:
        assert hasattr(eviction, name)


def test_fits_without_evicting() -> None:
    entries = [entry("a"), entry("b")]
    result = plan(entries, need_bytes=GB, usage=Usage(2 * GB), limits=limits(3 * GB), now=NOW)
    assert result.victims == ()
    assert result.satisfied
    assert result.bytes_freed == 0


def test_least_recently_used_goes_first_and_only_as_much_as_needed() -> None:
    entries = [entry("new", age_h=60), entry("old", age_h=90), entry("mid", age_h=70)]
    result = plan(entries, need_bytes=2 * GB, usage=Usage(3 * GB), limits=limits(3 * GB), now=NOW)
    assert result.victim_ids == ("old", "mid")
    assert result.bytes_freed == 2 * GB
    assert result.satisfied
    assert not result.used_hot
    assert [v.reason for v in result.victims] == ["cold", "cold"]


def test_pinned_and_leased_are_never_chosen() -> None:
    entries = [
        entry("pinned", age_h=500, pinned=True),
        entry("leased", age_h=400, leased=True),
        entry("free", age_h=60),
    ]
    result = plan(entries, need_bytes=GB, usage=Usage(3 * GB), limits=limits(3 * GB), now=NOW)
    assert result.victim_ids == ("free",)


def test_hot_window_is_used_last_and_flagged() -> None:
    entries = [entry("hot-old", age_h=40), entry("hot-new", age_h=1), entry("cold", age_h=50)]
    lim = limits(3 * GB, hot_window_s=48 * HOUR)
    one = plan(entries, need_bytes=GB, usage=Usage(3 * GB), limits=lim, now=NOW)
    assert one.victim_ids == ("cold",)
    assert not one.used_hot
    two = plan(entries, need_bytes=2 * GB, usage=Usage(3 * GB), limits=lim, now=NOW)
    assert two.victim_ids == ("cold", "hot-old")
    assert two.used_hot
    assert [(v.hot, v.reason) for v in two.victims] == [(False, "cold"), (True, "hot-window")]


def test_hot_window_with_plain_lru_order() -> None:
    entries = [entry("hot", age_h=1), entry("cold", age_h=50), entry("colder", age_h=60)]
    lim = limits(3 * GB, frequency_aging_s=None)
    result = plan(entries, need_bytes=3 * GB, usage=Usage(3 * GB), limits=lim, now=NOW)
    assert result.victim_ids == ("colder", "cold", "hot")
    assert [v.hot for v in result.victims] == [False, False, True]


def test_frequency_keeps_a_much_used_pipeline_over_a_newer_one_within_a_tier() -> None:
    # Both cold; "busy" was used 10 h earlier but 5 times more: one load is worth 48 h.
    entries = [entry("busy", age_h=70, loads=6), entry("once", age_h=60, loads=1)]
    lim = limits(2 * GB)
    assert plan(entries, need_bytes=GB, usage=Usage(2 * GB), limits=lim, now=NOW).victim_ids == (
        "once",
    )
    plain = limits(2 * GB, frequency_aging_s=None)
    assert plan(entries, need_bytes=GB, usage=Usage(2 * GB), limits=plain, now=NOW).victim_ids == (
        "busy",
    )


def test_frequency_never_lets_a_cold_pipeline_outlive_a_hot_one() -> None:
    entries = [entry("was-busy", age_h=100, loads=1000), entry("hot", age_h=1, loads=1)]
    result = plan(entries, need_bytes=GB, usage=Usage(2 * GB), limits=limits(2 * GB), now=NOW)
    assert result.victim_ids == ("was-busy",)


def test_never_used_pipeline_is_as_recent_as_its_registration() -> None:
    fresh = Entry("fresh", {"f": GB}, None, registered_at=NOW - HOUR)
    stale = entry("stale", age_h=10)
    result = plan(
        [fresh, stale], need_bytes=GB, usage=Usage(2 * GB), limits=limits(2 * GB), now=NOW
    )
    assert result.victim_ids == ("stale",)
    assert result.used_hot


def test_shared_blob_is_freed_only_with_its_last_referent() -> None:
    shared = {"base": 10 * GB}
    a = entry("a", age_h=90, blobs={"base": 10 * GB, "a-own": GB})
    b = entry("b", age_h=80, blobs={"base": 10 * GB, "b-own": GB})
    keep = entry("keep", age_h=1, blobs={"k": GB})
    entries = [a, b, keep]
    assert total(entries) == 13 * GB
    # One own blob is enough: "base" stays because b still holds it.
    one = plan(entries, need_bytes=GB, usage=Usage(13 * GB), limits=limits(13 * GB), now=NOW)
    assert one.victim_ids == ("a",)
    assert one.bytes_freed == GB
    # 3 GB: a frees 1 (base still held by b), b frees 1 + 10, counted once, on b.
    three = plan(entries, need_bytes=3 * GB, usage=Usage(13 * GB), limits=limits(13 * GB), now=NOW)
    assert three.victim_ids == ("a", "b")
    assert [v.bytes_freed for v in three.victims] == [GB, 11 * GB]
    assert three.bytes_freed == 12 * GB == bytes_freed_by(entries, {"a", "b"})
    assert shared  # the blob map above is the one both pipelines share


def test_blob_shared_with_a_pinned_pipeline_is_never_counted() -> None:
    entries = [
        entry("cold", age_h=90, blobs={"base": 10 * GB}),
        entry("pinned", age_h=1, blobs={"base": 10 * GB}, pinned=True),
        entry("other", age_h=80, blobs={"o": 2 * GB}),
    ]
    result = plan(entries, need_bytes=GB, usage=Usage(12 * GB), limits=limits(12 * GB), now=NOW)
    # "cold" frees nothing (its only blob stays with the pinned one), so it is not in the plan.
    assert result.victim_ids == ("other",)
    assert result.bytes_freed == 2 * GB


def test_unsatisfiable_evicts_nothing() -> None:
    entries = [entry("a", age_h=90), entry("pinned", pinned=True), entry("leased", leased=True)]
    result = plan(entries, need_bytes=2 * GB, usage=Usage(3 * GB), limits=limits(3 * GB), now=NOW)
    assert not result.satisfied
    assert result.victims == ()
    assert result.bytes_freed == 0
    assert "cannot make room" in result.reason


def test_all_pinned_and_a_new_fill_evicts_nothing() -> None:
    entries = [entry(str(i), pinned=True) for i in range(5)]
    result = plan(entries, need_bytes=GB, usage=Usage(5 * GB), limits=limits(5 * GB), now=NOW)
    assert not result.satisfied
    assert result.victims == ()


def test_reserved_bytes_count_against_capacity() -> None:
    entries = [entry("a", age_h=90), entry("b", age_h=80)]
    result = plan(
        entries, need_bytes=GB, usage=Usage(2 * GB, reserved=GB), limits=limits(3 * GB), now=NOW
    )
    assert result.victim_ids == ("a",)


def test_need_zero_resolves_an_over_committed_node() -> None:
    entries = [entry("a", age_h=90), entry("b", age_h=1)]
    result = plan(entries, need_bytes=0, usage=Usage(2 * GB), limits=limits(GB), now=NOW)
    assert result.victim_ids == ("a",)
    assert result.satisfied


def test_watermark_pass_trims_cold_down_to_the_low_watermark() -> None:
    entries = [entry(f"c{i}", age_h=100 + i) for i in range(10)]
    lim = limits(10 * GB, high_watermark=0.9, low_watermark=0.6)
    assert plan_watermark(entries[:9], usage=Usage(9 * GB), limits=lim, now=NOW).victims == ()
    result = plan_watermark(entries, usage=Usage(10 * GB), limits=lim, now=NOW)
    assert result.satisfied
    assert result.bytes_freed == 4 * GB
    assert result.victim_ids == ("c9", "c8", "c7", "c6")
    assert {v.reason for v in result.victims} == {"watermark"}


def test_watermark_pass_never_takes_hot_pipelines() -> None:
    entries = [entry("cold", age_h=100), *(entry(f"h{i}", age_h=i) for i in range(9))]
    lim = limits(10 * GB, high_watermark=0.9, low_watermark=0.5)
    result = plan_watermark(entries, usage=Usage(10 * GB), limits=lim, now=NOW)
    assert result.victim_ids == ("cold",)
    assert not result.satisfied
    assert not result.used_hot


def test_ties_are_broken_by_pipeline_id_and_plans_are_deterministic() -> None:
    entries = [entry(pid, age_h=90) for pid in ("c", "a", "b")]
    lim = limits(3 * GB)
    first = plan(entries, need_bytes=2 * GB, usage=Usage(3 * GB), limits=lim, now=NOW)
    again = plan(
        list(reversed(entries)), need_bytes=2 * GB, usage=Usage(3 * GB), limits=lim, now=NOW
    )
    assert first == again
    assert first.victim_ids == ("a", "b")


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        (lambda: Limits(capacity=-1), "capacity must be >= 0"),
        (
            lambda: Limits(capacity=1, high_watermark=0.5, low_watermark=0.8),
            "watermarks must satisfy 0 < low <= high <= 1",
        ),
        (lambda: Limits(capacity=1, hot_window_s=-1), "hot_window_s must be >= 0"),
        (lambda: Limits(capacity=1, frequency_aging_s=0), "frequency_aging_s must be > 0"),
        (lambda: Usage(committed=-1), "usage must be >= 0"),
        (lambda: Entry("x", {"b": -1}, None, 0.0), "x: blob sizes must be >= 0"),
    ],
)
def test_invalid_inputs_are_rejected(bad: Callable[[], object], reason: str) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        bad()


def test_inconsistent_blob_sizes_and_duplicate_ids_are_rejected() -> None:
    lim, usage = limits(GB), Usage(2 * GB)
    with pytest.raises(ValueError, match="sizes"):
        plan(
            [entry("a", blobs={"x": 1}), entry("b", blobs={"x": 2})],
            need_bytes=0,
            usage=usage,
            limits=lim,
            now=NOW,
        )
    with pytest.raises(ValueError, match="duplicate"):
        plan([entry("a"), entry("a")], need_bytes=0, usage=usage, limits=lim, now=NOW)


def test_plans_are_frozen() -> None:
    result = plan([entry("a")], need_bytes=GB, usage=Usage(GB), limits=limits(GB), now=NOW)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.satisfied = False  # type: ignore[misc]


# --------------------------------------------------------------------------- properties

BLOBS = [f"blob{i}" for i in range(12)]
BLOB_SIZE = {b: (i % 5 + 1) * 7 for i, b in enumerate(BLOBS)}  # one digest, one size


RARELY = st.integers(0, 4).map(lambda n: n == 0)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[list[Entry], int, Usage, Limits]:
    n = draw(st.integers(0, 10))
    entries = []
    for i in range(n):
        held = draw(st.lists(st.sampled_from(BLOBS), max_size=4, unique=True))
        entries.append(
            Entry(
                pipeline_id=f"p{i}",
                blobs={b: BLOB_SIZE[b] for b in held},
                last_used_at=draw(st.none() | st.floats(0, 100, allow_nan=False)),
                registered_at=draw(st.floats(0, 50, allow_nan=False)),
                pinned=draw(RARELY),
                leased=draw(RARELY),
                loads=draw(st.integers(0, 5)),
            )
        )
    on_disk = total(entries)
    lim = Limits(
        capacity=draw(st.integers(0, 150)),
        high_watermark=0.9,
        low_watermark=draw(st.sampled_from([0.5, 0.8, 0.9])),
        hot_window_s=draw(st.sampled_from([0.0, 30.0, 60.0, 1000.0])),
        frequency_aging_s=draw(st.sampled_from([None, 10.0, 48 * HOUR])),
    )
    usage = Usage(committed=on_disk + draw(st.integers(0, 10)), reserved=draw(st.integers(0, 20)))
    return entries, draw(st.integers(0, 60)), usage, lim


def _check_common(entries: list[Entry], result: eviction.EvictionPlan, now: float) -> None:
    by_id = {e.pipeline_id: e for e in entries}
    ids = set(result.victim_ids)
    assert len(ids) == len(result.victims)
    assert all(by_id[v].evictable for v in ids)
    assert result.bytes_freed == bytes_freed_by(entries, ids)
    assert result.bytes_freed == sum(v.bytes_freed for v in result.victims)
    assert result.used_hot == any(v.hot for v in result.victims)
    # Every victim frees something that would otherwise stay.
    for v in ids:
        assert bytes_freed_by(entries, ids - {v}) < result.bytes_freed


@settings(max_examples=400, deadline=None)
@given(scenarios(), st.floats(0, 200, allow_nan=False))
def test_plan_properties(scenario: tuple[list[Entry], int, Usage, Limits], now: float) -> None:
    entries, need, usage, lim = scenario
    result = plan(entries, need_bytes=need, usage=usage, limits=lim, now=now)
    _check_common(entries, result, now)
    if result.satisfied:
        assert usage.total - result.bytes_freed + need <= lim.capacity
    else:
        assert result.victims == ()
        everything = {e.pipeline_id for e in entries if e.evictable}
        assert usage.total - bytes_freed_by(entries, everything) + need > lim.capacity
    ids = set(result.victim_ids)
    if result.used_hot:
        # A hot victim only once no cold evictable pipeline left out could free anything more.
        for e in entries:
            cold = not eviction.is_hot(e, now=now, hot_window_s=lim.hot_window_s)
            if e.evictable and cold and e.pipeline_id not in ids:
                assert bytes_freed_by(entries, ids | {e.pipeline_id}) == result.bytes_freed
    assert plan(list(reversed(entries)), need_bytes=need, usage=usage, limits=lim, now=now) == (
        result
    )


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.floats(0, 200, allow_nan=False))
def test_watermark_properties(scenario: tuple[list[Entry], int, Usage, Limits], now: float) -> None:
    entries, _, usage, lim = scenario
    result = plan_watermark(entries, usage=usage, limits=lim, now=now)
    _check_common(entries, result, now)
    assert not result.used_hot
    if usage.total <= lim.high_bytes:
        assert result.victims == ()
    elif result.satisfied:
        assert usage.total - result.bytes_freed <= lim.low_bytes
    else:
        cold = {
            e.pipeline_id
            for e in entries
            if e.evictable and not eviction.is_hot(e, now=now, hot_window_s=lim.hot_window_s)
        }
        assert result.bytes_freed == bytes_freed_by(entries, cold)
