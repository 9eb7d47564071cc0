"""A Hypothesis state machine over a real :class:`CacheNode`, checked against a model of the cache.

Rules: register (from a pool of small model dirs, some sharing identical files so blobs are
shared, one larger than the free space and one larger than the node), let warm jobs run a little
or to the end, load (manifest, then every blob read back verified), lease and release, pin,
evict, delete, the watermark pass, flip a byte of a committed blob, and crash + restart.

The node runs in-process on an event loop the machine owns. Worker-thread calls run inline on
that loop (``anyio.to_thread.run_sync`` is replaced for the test), so between two rules nothing
runs at all: warm jobs stop at an await point, and a crash is exactly what ``kill -9`` leaves
there. A crash abandons the loop with its jobs unfinished and no clean-up, closes the metadata
handles, and starts a new node on the same data dir.

Invariants after every step:

* no pipeline is evicted by the policy while pinned or leased;
* committed + reserved + temp <= capacity;
* committed bytes equal the sizes of the files under ``blobs/`` (``du``) and of the blob records;
* every blob of a warm pipeline is on disk with its recorded size;
* a 507 evicts nothing;
* no byte is served that fails its digest: a flipped byte is an IntegrityError, and the blob is
  quarantined.

The run is checked to reach at least 2,000 steps.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import anyio.to_thread
import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from safetensors.numpy import save

from api.schema import ModelSpec, PipelineSpec
from api.views import pipeline_status
from cache_node.errors import Conflict, InsufficientStorage, IntegrityError, NotFound, NotWarm
from cache_node.node import CacheNode
from cache_node.settings import EvictionSettings, FetchSettings, NodeSettings
from cache_node.tenants import DEFAULT_TENANT

T = TypeVar("T")
KiB = 1024
MiB = 1024 * KiB
CAPACITY = 160 * KiB
PIPELINES = ("p0", "p1", "p2", "p3", "p4", "p5")
MIN_STEPS = 2000
EXAMPLES = 200
STEPS_PER_EXAMPLE = 30


@dataclass(frozen=True)
class Pool:
    """Model dirs to register from: name → directory."""

    dirs: dict[str, Path]


def _weights(nbytes: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return save({"w": rng.integers(0, 256, nbytes, dtype=np.uint8)})


def _build_pool(root: Path) -> Pool:
    """Small models; ``shared-a`` and ``shared-b`` appear in several, so their blobs are shared."""
    shared_a, shared_b = _weights(20 * KiB, 1), _weights(12 * KiB, 2)
    config = b'{"model_type": "bert"}'  # the same config everywhere: a small shared blob
    layout: dict[str, dict[str, bytes]] = {
        "m0": {"a.safetensors": shared_a, "config.json": config},
        "m1": {"a.safetensors": shared_a, "x.safetensors": _weights(16 * KiB, 3),
               "config.json": config},
        "m2": {"w.safetensors": _weights(28 * KiB, 4), "config.json": b'{"n": 2}'},
        "m3": {"b.safetensors": shared_b, "y.safetensors": _weights(8 * KiB, 5),
               "config.json": config},
        "m4": {"b.safetensors": shared_b, "tokenizer.json": b'{"v": 4}'},
        "m5": {"z.safetensors": _weights(36 * KiB, 6)},
        # two files: the first fits after evicting little, the pair needs most of the node
        "big": {"a.safetensors": _weights(30 * KiB, 7), "b.safetensors": _weights(80 * KiB, 8)},
        "huge": {"h.safetensors": _weights(CAPACITY + KiB, 9)},  # can never fit
    }
    dirs = {}
    for name, files in layout.items():
        directory = root / name
        directory.mkdir(parents=True)
        for path, data in files.items():
            (directory / path).write_bytes(data)
        dirs[name] = directory
    return Pool(dirs)


async def _inline_run_sync(
    func: Callable[..., T],
    *args: Any,
    abandon_on_cancel: bool = False,
    cancellable: bool | None = None,
    limiter: Any = None,
) -> T:
    """``anyio.to_thread.run_sync`` without the thread: a yield point, then the call."""
    await asyncio.sleep(0)
    return func(*args)


class StepCounter:
    """Rules run across every example of the test."""

    def __init__(self) -> None:
        self.steps = 0
        self.examples = 0
        self.kinds: dict[str, int] = {}
        self.quarantined = 0  # flipped bytes caught by a verified read

    def count(self, kind: str) -> None:
        self.steps += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1


class CacheMachine(RuleBasedStateMachine):
    """One node, one data dir per example; the model is what the node was told."""

    def __init__(self, pool: Pool, base: Path, counter: StepCounter) -> None:
        super().__init__()
        self.pool = pool
        self.counter = counter
        counter.examples += 1
        self.data_dir = Path(tempfile.mkdtemp(dir=base))
        self.settings = NodeSettings(
            data_dir=self.data_dir,
            capacity=CAPACITY,
            node_id="sm",
            local_roots=sorted({d.parent for d in pool.dirs.values()}),
            fetch=FetchSettings(part_size=MiB, negative_cache_s=0),
            eviction=EvictionSettings(hot_window_s=0.05, high_watermark=0.8, low_watermark=0.5),
        )
        self.dead_loops: list[asyncio.AbstractEventLoop] = []
        self.loop = asyncio.new_event_loop()
        self.node = self._start_node()
        # the model
        self.registered: dict[str, str] = {}  # pipeline → pool dir
        self.pinned: set[str] = set()
        self.leases: dict[str, list[str]] = {p: [] for p in PIPELINES}
        self.evicted_seen: dict[str, tuple[str, int]] = {}  # pipeline → (reason, generation)

    # ------------------------------------------------------------------ plumbing
    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def _start_node(self) -> CacheNode:
        node = CacheNode(self.settings)
        self._run(node.start())
        return node

    def _states(self) -> dict[str, tuple[str, str | None, int]]:
        return {
            r.id: (r.state, r.evicted_reason, r.generation) for r in self.node.registry.all()
        }

    async def _advance(self, ticks: int) -> None:
        for _ in range(ticks):
            await asyncio.sleep(0)

    async def _settle(self) -> None:
        """Run the loop until every job and transfer has finished (the watermark loop sleeps)."""
        me = asyncio.current_task()
        loops = ("watermarks", "retries", "housekeeping")  # they sleep between passes
        for _ in range(100_000):
            busy = [
                t for t in asyncio.all_tasks()
                if t is not me and t.get_name() not in loops and not t.done()
            ]
            if not busy:
                return
            await asyncio.sleep(0)
        raise AssertionError(f"jobs still running: {busy}")

    def _spec(self, source: str, *, pinned: bool) -> PipelineSpec:
        return PipelineSpec(
            models=[ModelSpec(name="m", source=f"file://{self.pool.dirs[source]}")],
            pinned=pinned,
        )

    # ------------------------------------------------------------------ rules
    @rule(
        pipeline=st.sampled_from(PIPELINES),
        source=st.sampled_from(["m0", "m1", "m2", "m3", "m4", "m5", "big", "huge"]),
        pinned=st.booleans(),
        ticks=st.integers(0, 40),
    )
    def register(self, pipeline: str, source: str, pinned: bool, ticks: int) -> None:
        """A (re-)registration; ``big`` may need eviction, ``huge`` never fits (disk full)."""
        self.counter.count("register")
        before = self._states()
        spec = self._spec(source, pinned=pinned and source not in ("big", "huge"))
        try:
            self._run(self.node.register(DEFAULT_TENANT, pipeline, spec))
        except InsufficientStorage:
            after = self._states()
            newly = {
                p for p, (state, _, _) in after.items()
                if state == "evicted" and before.get(p, ("",))[0] != "evicted"
            }
            assert not newly, f"a 507 evicted {newly}"
            # A fill that was about to finish may finish on the loop's turn that runs the
            # registration: then the pipeline was warm when the node looked, and the new spec
            # failed beside it (same generation), as if it had been warm before.
            was_warm = before.get(pipeline, ("",))[0] == "warm" or (
                after[pipeline][0] == "warm"
                and after[pipeline][2] == before.get(pipeline, ("", None, -1))[2]
            )
            if was_warm:  # the new spec failed beside it
                assert after[pipeline][0] == "warm"
                status = pipeline_status(self.node, self.node.record(DEFAULT_TENANT, pipeline))
                assert status.last_attempt is not None
                assert status.last_attempt.error is not None
                assert status.last_attempt.error.code == "insufficient_storage"
            else:
                assert after[pipeline][0] == "failed"
        self.registered[pipeline] = source
        self._track_pin(pipeline, spec.pinned)
        self._run(self._advance(ticks))

    def _track_pin(self, pipeline: str, pinned: bool) -> None:
        """Pinned is what the pipeline's own spec says, or what its new spec filling beside a
        warm version says (a failed new spec leaves the warm version as it was)."""
        self.pinned.discard(pipeline)
        record = self.node.registry.get(DEFAULT_TENANT, pipeline)
        if record is None:
            return
        if record.spec.pinned or (
            pinned and record.pending is not None and record.pending.state != "failed"
        ):
            self.pinned.add(pipeline)

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def pin(self, data: st.DataObject) -> None:
        """Re-register a pipeline with the same source, pinned."""
        self.counter.count("pin")
        pipeline = data.draw(st.sampled_from(sorted(self.registered)))
        source = self.registered[pipeline]
        with contextlib.suppress(InsufficientStorage):
            self._run(self.node.register(DEFAULT_TENANT, pipeline, self._spec(source, pinned=True)))
        self.pinned.add(pipeline)  # recorded with the pin; a failed one keeps no bytes ...
        record = self.node.registry.get(DEFAULT_TENANT, pipeline)
        if record is not None and record.state == "warm" and not record.spec.pinned:
            self._track_pin(pipeline, True)  # ... unless the unpinned warm version stays

    @rule(ticks=st.integers(1, 60))
    def advance(self, ticks: int) -> None:
        """Let warm jobs run a little: a later rule meets them half done."""
        self.counter.count("advance")
        self._run(self._advance(ticks))

    @rule()
    def settle(self) -> None:
        """Let every job finish; then nothing is warming and only a 507 is a failure."""
        self.counter.count("settle")
        self._run(self._settle())
        for record in self.node.registry.all():
            assert record.state != "warming", f"{record.id} warming with no job"
            if record.state == "failed":
                assert record.error is not None
                assert record.error.code == "insufficient_storage", record.error
        referenced = {sha for r in self.node.registry.all() for sha in r.blobs()}
        stored = {r.sha256 for r in self.node.store.records()}
        assert stored <= referenced, f"blobs no pipeline holds: {stored - referenced}"

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def load(self, data: st.DataObject) -> None:
        """A replica: manifest, then every blob read back; each byte must match its digest."""
        self.counter.count("load")
        pipeline = data.draw(st.sampled_from(sorted(self.registered)))
        state = self.node.record(DEFAULT_TENANT, pipeline).state
        try:
            manifest = self.node.manifest(DEFAULT_TENANT, pipeline, tp_size=1, rank=0)
        except NotWarm:
            assert state != "warm", f"warm {pipeline} refused a manifest"
            return
        except IntegrityError as exc:  # a flipped safetensors header: caught before use
            sha = exc.details["sha256"]
            assert not self.node.store.has(sha)
            assert (self.data_dir / "quarantine" / sha).exists()
            assert self.node.record(DEFAULT_TENANT, pipeline).state != "warm"
            self.counter.quarantined += 1
            return
        assert state == "warm"
        for blob in manifest.blobs:
            self.node.authorize_blob(DEFAULT_TENANT, blob.sha256)
            path = self.node.store.blob_path(blob.sha256)
            if not path.exists():  # an earlier blob's quarantine made the pipeline cold
                assert self.node.record(DEFAULT_TENANT, pipeline).state != "warm"
                continue
            flipped = hashlib.sha256(path.read_bytes()).hexdigest() != blob.sha256
            try:
                body = b"".join(self.node.iter_blob(blob.sha256, 0, blob.size))
            except IntegrityError:
                assert flipped, f"{blob.sha256} failed verification but is intact"
                assert not self.node.store.has(blob.sha256)
                assert (self.data_dir / "quarantine" / blob.sha256).exists()
                assert not path.exists()
                assert self.node.record(DEFAULT_TENANT, pipeline).state != "warm"
                self.counter.quarantined += 1
                continue
            assert hashlib.sha256(body).hexdigest() == blob.sha256, "served a bad byte"

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def lease(self, data: st.DataObject) -> None:
        self.counter.count("lease")
        pipeline = data.draw(st.sampled_from(sorted(self.registered)))
        self.leases[pipeline].append(self.node.create_lease(DEFAULT_TENANT, pipeline).lease_id)

    @precondition(lambda self: any(self.leases.values()))
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        self.counter.count("release")
        pipeline = data.draw(st.sampled_from(sorted(p for p, ls in self.leases.items() if ls)))
        self.node.release_lease(DEFAULT_TENANT, self.leases[pipeline].pop())

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def evict(self, data: st.DataObject) -> None:
        """A manual eviction: refused while leased, otherwise the pipeline ends ``evicted``."""
        self.counter.count("evict")
        pipeline = data.draw(st.sampled_from(sorted(self.registered)))
        try:
            self._run(self.node.evict(DEFAULT_TENANT, pipeline))
        except Conflict:
            assert self.leases[pipeline], f"{pipeline} refused eviction without a lease"
            return
        assert not self.leases[pipeline], f"{pipeline} evicted while leased"
        status = pipeline_status(self.node, self.node.record(DEFAULT_TENANT, pipeline))
        assert (status.state, status.evicted_reason) == ("evicted", "manual")
        assert status.bytes_cached == 0

    @precondition(lambda self: self.registered)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.counter.count("delete")
        pipeline = data.draw(st.sampled_from(sorted(self.registered)))
        self._run(self.node.delete(DEFAULT_TENANT, pipeline))
        del self.registered[pipeline]
        self.pinned.discard(pipeline)
        self.evicted_seen.pop(pipeline, None)
        try:
            self.node.record(DEFAULT_TENANT, pipeline)
        except NotFound:
            pass
        else:
            raise AssertionError(f"{pipeline} still there after delete")

    @rule()
    def watermarks(self) -> None:
        """The background pass: above the high watermark, trim cold pipelines."""
        self.counter.count("watermarks")
        self.node.enforce_watermarks()

    @rule(data=st.data())
    def corrupt(self, data: st.DataObject) -> None:
        """Flip one byte of a committed blob on disk."""
        self.counter.count("corrupt")
        # What is on disk now depends on fills still running: drawn as plain numbers, so the
        # draws are the same whatever it is (hypothesis replays a case by its draws)
        pick, at = data.draw(st.integers(0, 2**16)), data.draw(st.integers(0, 2**32))
        blobs = sorted(r.sha256 for r in self.node.store.records() if r.size > 0)
        if not blobs:
            return
        sha = blobs[pick % len(blobs)]
        path = self.node.store.blob_path(sha)
        offset = at % path.stat().st_size
        before = path.stat()
        with open(path, "r+b") as handle:
            handle.seek(offset)
            byte = handle.read(1)
            handle.seek(offset)
            handle.write(bytes([byte[0] ^ 0xFF]))
        # A write moves the mtime, but file times are coarse (a clock tick): make sure it moved,
        # as the store's memo of verified chunks is keyed on it.
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 1_000_000_000))

    @rule(leftovers=st.booleans())
    def crash_and_restart(self, leftovers: bool) -> None:
        """kill -9 at an await point, optionally with a torn publish left behind, then start."""
        self.counter.count("crash")
        self.dead_loops.append(self.loop)
        self.node.meta.close()
        if leftovers:  # what a crash between rename and metadata commit, or mid-temp, leaves
            orphan = "0" * 63 + "1"
            (self.data_dir / "blobs" / orphan[:2]).mkdir(exist_ok=True)
            (self.data_dir / "blobs" / orphan[:2] / orphan).write_bytes(b"torn")
            (self.data_dir / "tmp" / "deadbeef.tmp").write_bytes(b"half")
        self.loop = asyncio.new_event_loop()
        self.node = self._start_node()

    # ------------------------------------------------------------------ invariants
    def _refresh_pins(self) -> None:
        """A new spec that was filling beside a pinned warm version and has now swapped in
        brings its own ``pinned``: an unpinned one makes the pipeline evictable."""
        for pipeline in list(self.pinned):
            record = self.node.registry.get(DEFAULT_TENANT, pipeline)
            if record is not None and record.pending is None and not record.spec.pinned:
                self.pinned.discard(pipeline)

    @invariant()
    def pinned_and_leased_pipelines_are_never_evicted_by_the_policy(self) -> None:
        self._refresh_pins()
        for pipeline, (state, reason, generation) in self._states().items():
            if state != "evicted":
                self.evicted_seen.pop(pipeline, None)
                continue
            assert reason is not None
            if self.evicted_seen.get(pipeline) == (reason, generation):
                continue  # seen before; pins and leases may have changed since
            self.evicted_seen[pipeline] = (reason, generation)
            if reason != "manual":
                assert pipeline not in self.pinned, f"pinned {pipeline} evicted ({reason})"
                assert not self.leases[pipeline], f"leased {pipeline} evicted ({reason})"

    @invariant()
    def space_is_within_capacity(self) -> None:
        usage = self.node.store.usage()
        assert usage.committed + usage.reserved + usage.temp <= CAPACITY, usage

    @invariant()
    def accounted_bytes_equal_du(self) -> None:
        on_disk = {p.name: p.stat().st_size for p in (self.data_dir / "blobs").rglob("*")
                   if p.is_file()}
        records = {r.sha256: r.size for r in self.node.store.records()}
        assert on_disk == records
        assert self.node.store.usage().committed == sum(on_disk.values())

    @invariant()
    def warm_pipelines_have_their_blobs(self) -> None:
        for record in self.node.registry.all():
            if record.state != "warm":
                continue
            # its own blobs and those of a swapped-out version still leased (a re-registration
            # filling beside it may not have its blobs yet)
            for sha, size in {**record.own_blobs(), **record.retired_blobs}.items():
                stored = self.node.store.get(sha)
                assert stored is not None, f"warm {record.id} lost blob {sha}"
                assert stored.size == size
                assert self.node.store.blob_path(sha).stat().st_size == size

    def teardown(self) -> None:
        for loop in [*self.dead_loops, self.loop]:
            # cancelling a job can spawn tasks of its own: repeat until none is left
            while tasks := asyncio.all_tasks(loop):
                for task in tasks:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()
        self.node.meta.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


@pytest.mark.timeout(900)  # a few minutes on two cores; more when they are shared
def test_cache_state_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """≥ 2,000 steps of random operations with every invariant checked after each."""
    # The same examples every run (CI must not pass or fail by the draw); the long run below
    # explores new ones each time.
    _run_machine(
        tmp_path, monkeypatch, examples=EXAMPLES, min_steps=MIN_STEPS, derandomize=True
    )


@pytest.mark.slow
@pytest.mark.timeout(0)
def test_cache_state_machine_long(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ten times as many examples, for ``make test-all`` (several minutes)."""
    _run_machine(tmp_path, monkeypatch, examples=10 * EXAMPLES, min_steps=10 * MIN_STEPS)


def _run_machine(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    examples: int,
    min_steps: int,
    derandomize: bool = False,
) -> None:
    monkeypatch.setattr(anyio.to_thread, "run_sync", _inline_run_sync)
    pool = _build_pool(tmp_path / "pool")
    base = tmp_path / "nodes"
    base.mkdir()
    counter = StepCounter()

    class Machine(CacheMachine):
        def __init__(self) -> None:
            super().__init__(pool, base, counter)

    run_state_machine_as_test(
        Machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=STEPS_PER_EXAMPLE,
            deadline=None,
            database=None,
            derandomize=derandomize,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        ),
    )
    print(
        f"state machine: {counter.steps} steps in {counter.examples} examples, "
        f"{counter.quarantined} flipped bytes caught: {counter.kinds}"
    )
    assert counter.steps >= min_steps, counter.steps
