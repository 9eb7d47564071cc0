"""Engine shard sets on a real vLLM engine (the CPU build): an architecture outside the Llama
family at TP 2.

GPT-2 has no per-rank shards: each rank reads the whole checkpoint and vLLM's weight loaders
slice it (full-tensor mode). Its first start uploads each rank's tensors as the engine ended
up with them (a capture, once the engine is ready); the second start replays them: each rank
reads its own capture (1/N of the split bytes, plus the replicated ones) straight into its
parameters, and generates exactly what vLLM's own loader does. A simulated other engine
version, another TP size and a changed checkpoint never pick the capture up; a capture whose
bytes are flipped on the node is caught, and that rank loads the normal way.

All engines run in one ``engine_run.py --serve`` process (vLLM imported once), one after the
other, so the test can act on the node between two of them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from loader.safetensors_format import parse_header, read_header
from tests.vllm_engine.harness import (
    MAX_TOKENS,
    TOP_LOGPROBS,
    EngineSession,
    artifact,
    assert_same_outputs,
    machine,
    node_process,
    outputs_of,
    register,
    wait_warm,
)
from tests.vllm_engine.models import PROMPTS, EngineCase, make_case

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

PIPELINE = "gpt2"
TP = 2
BASE = EngineCase("gpt2-capture", "gpt2", 1001, tie=True, tp2_mode="full")
#: The same layout, other weights (another seed): what a fine-tune of the base looks like.
TUNED = EngineCase("gpt2-tuned", "gpt2", 1001, tie=True, tp2_mode="full")
SIMULATED_VERSION = "0.0.0-simulated"


@dataclass
class CaptureRuns:
    """Every engine's result, and what the node held along the way."""

    url: str
    data_dir: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: The captures after the first start, and each rank's capture file as the node had it.
    captures: list[dict[str, Any]] = field(default_factory=list)
    files: dict[int, bytes] = field(default_factory=dict)
    status_after_first: dict[str, Any] = field(default_factory=dict)
    captures_after_fallback: list[dict[str, Any]] = field(default_factory=list)
    captures_after_tuning: list[dict[str, Any]] = field(default_factory=list)
    checkpoint_bytes: int = 0
    log: Path = field(default_factory=Path)


def _captures(url: str) -> list[dict[str, Any]]:
    listed: list[dict[str, Any]] = httpx.get(
        f"{url}/v1/pipelines/{PIPELINE}/captures", timeout=30).json()["captures"]
    return listed


def _tensor_bytes(directory: Path) -> int:
    """The bytes of every tensor of a checkpoint: what a full-tensor rank reads."""
    header = read_header(directory / "model.safetensors")
    return sum(t.nbytes for t in header.tensors)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> Iterator[CaptureRuns]:
    root = tmp_path_factory.mktemp("capture-sources")
    base, tuned = make_case(BASE, root / "base"), make_case(TUNED, root / "tuned")
    data_dir = tmp_path_factory.mktemp("capture-node")
    spec = {"prompts": [list(p) for p in PROMPTS], "max_tokens": MAX_TOKENS,
            "logprobs": TOP_LOGPROBS}
    with node_process(data_dir, root, "captures-node.log") as (url, _):
        register(url, PIPELINE, {"llm": base}, tp_sizes=(1, 2, 4))
        wait_warm(url, PIPELINE)
        state = CaptureRuns(url=url, data_dir=data_dir, checkpoint_bytes=_tensor_bytes(base))
        session = EngineSession(vllm_python, "captures-engines", spec)
        state.log = session.log

        def weightcache(name: str, *, tp: int = TP, model_dir: Path = base,
                        await_captures: int = 0, **options: Any) -> dict[str, Any]:
            run: dict[str, Any] = {
                "name": name, "model_dir": str(model_dir), "tp": tp,
                "load_format": "weightcache",
                "extra": {"pipeline": PIPELINE, "url": url, **options},
                "reports": {"url": url, "pipeline": PIPELINE},
            }
            if options.get("capture", True) is True:
                # the uploads wait for the engine to be ready, as under `weightcache launch`
                run["ready_file"] = run["extra"]["ready_file"] = str(root / f"ready-{name}")
            if await_captures:
                run["await_captures"] = {"url": url, "pipeline": PIPELINE,
                                         "count": await_captures}
            return session.run(run)

        try:
            state.results["vllm"] = session.run({"name": "vllm", "model_dir": str(base), "tp": TP})
            state.results["first"] = weightcache("first", await_captures=TP)
            state.captures = _captures(url)
            state.status_after_first = httpx.get(f"{url}/v1/pipelines/{PIPELINE}",
                                                 timeout=30).json()
            for capture in state.captures:
                info = httpx.get(f"{url}/v1/pipelines/{PIPELINE}/captures/{capture['id']}",
                                 timeout=30).json()
                blob = httpx.get(f"{url}/v1/blobs/{info['blob']['sha256']}", timeout=30)
                state.files[capture["key"]["rank"]] = blob.content
            state.results["replay"] = weightcache("replay")
            state.results["other-version"] = weightcache(
                "other-version", capture="replay-only", engine_version=SIMULATED_VERSION)
            state.results["tp4"] = weightcache("tp4", tp=4, capture="replay-only")
            # flip one byte of rank 0's capture where it lies on the node's disk
            rank0 = next(c for c in state.captures if c["key"]["rank"] == 0)
            sha = httpx.get(f"{url}/v1/pipelines/{PIPELINE}/captures/{rank0['id']}",
                            timeout=30).json()["blob"]["sha256"]
            path = data_dir / "blobs" / sha[:2] / sha
            corrupted = bytearray(path.read_bytes())
            corrupted[len(corrupted) // 2] ^= 0x40
            path.write_bytes(bytes(corrupted))
            state.results["corrupted"] = weightcache("corrupted", await_captures=TP)
            state.captures_after_fallback = _captures(url)
            # a fine-tune of the same layout is registered in the base's place
            register(url, PIPELINE, {"llm": tuned}, tp_sizes=(1, 2, 4))
            wait_warm(url, PIPELINE)
            state.captures_after_tuning = _captures(url)
            state.results["tuned"] = weightcache("tuned", model_dir=tuned,
                                                 capture="replay-only")
            state.results["tuned-vllm"] = session.run(
                {"name": "tuned-vllm", "model_dir": str(tuned), "tp": TP})
        finally:
            session.close()
        yield state


def _outputs(runs: CaptureRuns, name: str) -> list[dict[str, Any]]:
    return outputs_of(runs.results.get(name), name, runs.log)


def _reports(runs: CaptureRuns, name: str, tp: int = TP) -> dict[int, dict[str, Any]]:
    """The load report of each rank of run ``name`` (one per rank, from the node's history)."""
    _outputs(runs, name)
    reports = {r["rank"]: r for r in runs.results[name]["reports"] if r["tp_size"] == tp}
    assert sorted(reports) == list(range(tp)), runs.results[name]["reports"]
    return reports


def _split(files: dict[int, bytes]) -> tuple[dict[int, int], int]:
    """Each rank's bytes of tensors that differ between the ranks (split), and the bytes of
    those every rank holds whole (replicated: the same bytes in every rank's capture)."""
    ranks: dict[int, dict[str, bytes]] = {}
    for rank, data in files.items():
        header = parse_header(data, file_size=len(data))
        ranks[rank] = {
            t.name: data[header.data_offset + t.start : header.data_offset + t.end]
            for t in header.tensors
        }
    names = set.intersection(*(set(tensors) for tensors in ranks.values()))
    assert all(set(tensors) == names for tensors in ranks.values())
    replicated = {n for n in names if len({ranks[r][n] for r in ranks}) == 1}
    split = {r: sum(len(t) for n, t in tensors.items() if n not in replicated)
             for r, tensors in ranks.items()}
    return split, sum(len(ranks[0][n]) for n in replicated)


def test_the_first_start_loads_full_tensors_and_uploads_each_ranks_capture(
    runs: CaptureRuns,
) -> None:
    assert_same_outputs(_outputs(runs, "vllm"), _outputs(runs, "first"), "first start")
    for rank, report in _reports(runs, "first").items():
        assert report["bytes"] == runs.checkpoint_bytes, rank  # the whole model, every rank
        assert report["capture"]["used"] is False
        assert "no weights capture" in report["capture"]["reason"]
    keys = sorted((c["key"] for c in runs.captures), key=lambda k: k["rank"])
    assert [k["rank"] for k in keys] == list(range(TP))
    for key in keys:
        assert (key["kind"], key["engine"], key["tp_size"], key["dtype"],
                key["quantization"]) == ("weights", "vllm", TP, "float32", "none")
        assert key["device"].startswith("cpu-")
        assert key["engine_version"] != SIMULATED_VERSION
    # on the CPU vLLM packs linear weights into oneDNN handles: the capture holds them as the
    # weight loaders left them, and the replay post-processes them again
    assert {c["stage"] for c in runs.captures} == {"loaded"}
    status = runs.status_after_first
    assert sorted(c["id"] for c in status["captures"]) == sorted(c["id"] for c in runs.captures)
    model_bytes = sum(m["bytes_total"] for m in status["models"])
    assert status["bytes_total"] == model_bytes + sum(c["bytes"] for c in runs.captures)


def test_the_second_start_replays_one_nth_of_the_split_bytes_per_rank(
    runs: CaptureRuns,
) -> None:
    assert_same_outputs(_outputs(runs, "vllm"), _outputs(runs, "replay"), "replayed capture")
    split, replicated = _split(runs.files)
    split_total = sum(split.values())
    by_rank = {c["key"]["rank"]: c for c in runs.captures}
    first = _reports(runs, "first")
    per_rank: dict[int, dict[str, float]] = {}
    key = runs.captures[0]["key"]
    figures = {"benchmark": "captures", **machine(),
               "engine": f"vllm {key['engine_version']} ({key['device']})",
               "model": f"{BASE.name} (GPT-2, float32), TP {TP}",
               "checkpoint_bytes": runs.checkpoint_bytes, "split_bytes": split_total,
               "replicated_bytes": replicated,
               "capture_bytes": sum(c["bytes"] for c in runs.captures), "ranks": per_rank}
    for rank, report in _reports(runs, "replay").items():
        use = report["capture"]
        assert use["used"] is True, use
        assert (use["id"], use["stage"]) == (by_rank[rank]["id"], "loaded")
        # 1/N of the split bytes, and the replicated ones: its capture's tensors and no more
        assert split[rank] == split_total // TP
        assert report["bytes"] == split_total // TP + replicated
        ratio = report["bytes"] / first[rank]["bytes"]
        per_rank[rank] = {"first_start_bytes": first[rank]["bytes"],
                                  "replay_bytes": report["bytes"], "ratio": round(ratio, 4)}
        print(f"rank {rank}/{TP}: first start {first[rank]['bytes']} bytes (the whole "
              f"checkpoint), replay {report['bytes']} = {split[rank]} split "
              f"(1/{TP} of {split_total}) + {replicated} replicated: {ratio:.3f} of the first")
        assert ratio < 0.6
    artifact("captures.json").write_text(json.dumps(figures, indent=1))


def test_another_engine_version_tp_size_or_checkpoint_never_picks_up_the_capture(
    runs: CaptureRuns,
) -> None:
    # another engine version: the node has captures of this snapshot, none of this key
    assert_same_outputs(_outputs(runs, "vllm"), _outputs(runs, "other-version"),
                        "another engine version")
    for report in _reports(runs, "other-version").values():
        assert report["capture"]["used"] is False
        assert "engine_version" in report["capture"]["reason"], report["capture"]
        assert report["bytes"] == runs.checkpoint_bytes  # the normal way: full tensors
    # another TP size
    tp4 = _reports(runs, "tp4", tp=4)
    assert all(len(o["tokens"]) == MAX_TOKENS for o in _outputs(runs, "tp4"))
    for report in tp4.values():
        assert report["capture"]["used"] is False
        assert "tp_size" in report["capture"]["reason"], report["capture"]
    # a changed checkpoint (same layout, other bytes): the captures of the old one are gone
    # with it, and the engine serves the new weights, never the old capture
    assert runs.captures_after_tuning == []
    tuned, base = _outputs(runs, "tuned"), _outputs(runs, "vllm")
    assert_same_outputs(_outputs(runs, "tuned-vllm"), tuned, "a changed checkpoint")
    assert [o["tokens"] for o in tuned] != [o["tokens"] for o in base]
    for report in _reports(runs, "tuned").values():
        assert report["capture"]["used"] is False


def test_a_capture_corrupted_on_the_node_is_caught_and_the_start_falls_back(
    runs: CaptureRuns,
) -> None:
    assert_same_outputs(_outputs(runs, "vllm"), _outputs(runs, "corrupted"), "after a fallback")
    reports = _reports(runs, "corrupted")
    bad, good = reports[0]["capture"], reports[1]["capture"]
    assert bad["used"] is False, bad
    assert "integrity_error" in bad["reason"] or "failed" in bad["reason"], bad
    assert reports[0]["bytes"] == runs.checkpoint_bytes  # rank 0 loaded the normal way
    assert good["used"] is True  # rank 1's capture was intact
    # the node put the bad blob aside; rank 0 uploaded its capture again, the same bytes
    quarantined = list((runs.data_dir / "quarantine").iterdir())
    assert len(quarantined) == 1
    again = {c["key"]["rank"]: c for c in runs.captures_after_fallback}
    assert sorted(again) == list(range(TP))
    assert {r: c["id"] for r, c in again.items()} == {
        c["key"]["rank"]: c["id"] for c in runs.captures}
