"""The vLLM plugin inside a real vLLM engine (the CPU build): ``make test-vllm``.

Each tiny checkpoint is served by a real ``weightcache serve`` process (a ``file://`` source
under ``--local-root``) and run twice by vLLM at each TP size: once with vLLM's own loader
reading the checkpoint, once with ``--load-format weightcache`` streaming the rank shards from
the node. Greedy tokens must be identical and the top log-probabilities equal to a tight
tolerance: both engines must hold bit-identical weights, or the outputs part.

The engines run in the vLLM venv (``.venv-vllm``, see the Makefile) through
``engine_run.py``: one process per TP size runs every engine of that size in turn, so vLLM is
imported once per size. The node and this test run in the project venv.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.node_server import free_port
from tests.vllm_engine.harness import (
    ARTIFACTS,
    ENGINE_RUN,
    MAX_TOKENS,
    REPO,
    TOP_LOGPROBS,
    VLLM_CLI,
    artifact,
    assert_same_outputs,
    engine_env,
    node_process,
    register,
    stop,
    tail,
    wait_for_line,
    wait_http,
    wait_warm,
)
from tests.vllm_engine.models import CASES, MEMORY_CASE, PROMPTS, EngineCase, make_case

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

MEMPROBE = Path(__file__).with_name("memprobe")
MiB = 1 << 20
#: What a weightcache load may hold beyond the parameters it fills: its staging ring (none on
#: the CPU, where tensors are read in place) and a few MiB of buffers. A second copy of a rank
#: of the memory case would be 150 MiB.
RING_ALLOWANCE = 64 * MiB
#: A two-model pipeline: each model's engine must take that model and nothing else.
PIPELINE_MODELS = {"base": "llama-untied", "chat": "qwen2-bias"}

@dataclass
class EngineNode:
    """A real cache node holding every case's pipeline, and where its sources live."""

    url: str
    dirs: dict[str, Path]
    process: subprocess.Popen[bytes]
    runs: dict[int, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, vllm_python: Path) -> Iterator[EngineNode]:
    root = tmp_path_factory.mktemp("vllm-sources")
    dirs = {case.name: make_case(case, root / case.name) for case in (*CASES, MEMORY_CASE)}
    data_dir = tmp_path_factory.mktemp("vllm-node")
    with node_process(data_dir, root, "node.log") as (url, process):
        for case in CASES:
            register(url, case.name, {"llm": dirs[case.name]})
        register(url, "duo", {name: dirs[case] for name, case in PIPELINE_MODELS.items()})
        register(url, MEMORY_CASE.name, {"llm": dirs[MEMORY_CASE.name]}, tp_sizes=(2,))
        for pipeline in [case.name for case in CASES] + ["duo", MEMORY_CASE.name]:
            wait_warm(url, pipeline)
        yield EngineNode(url=url, dirs=dirs, process=process)


def _engine_runs(node: EngineNode, tp: int) -> list[dict[str, Any]]:
    runs: list[dict[str, Any]] = []
    for case in CASES:
        model_dir = str(node.dirs[case.name])
        runs.append({"name": f"{case.name}/vllm", "model_dir": model_dir, "tp": tp})
        runs.append({
            "name": f"{case.name}/weightcache", "model_dir": model_dir, "tp": tp,
            "load_format": "weightcache",
            "extra": {"pipeline": case.name, "url": node.url},
        })
    for model, case_name in PIPELINE_MODELS.items():
        runs.append({
            "name": f"duo/{model}/weightcache", "model_dir": str(node.dirs[case_name]), "tp": tp,
            "load_format": "weightcache",
            "extra": {"pipeline": "duo", "model": model, "url": node.url},
        })
    return runs


def run_engines(
    vllm_python: Path, batch: str, spec: dict[str, Any], *, probe: bool = False
) -> dict[str, Any]:
    """Run ``spec``'s engines in one ``engine_run.py`` process; their results by run name.

    vLLM's engine core (and at TP 1 its worker) runs in that process. ``probe`` puts the memory
    probe (``memprobe/sitecustomize.py``) in every process of the engines.
    """
    out = artifact(f"engines-{batch}.json")
    out.unlink(missing_ok=True)
    spec_file = artifact(f"engines-{batch}.spec.json")
    spec_file.write_text(json.dumps(spec))
    log = artifact(f"engines-{batch}.log")
    env = engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0")
    if probe:
        env["PYTHONPATH"] = os.pathsep.join([str(MEMPROBE), env.get("PYTHONPATH", "")])
    started = time.monotonic()
    with open(log, "wb") as sink:
        process = subprocess.Popen(
            [str(vllm_python), str(ENGINE_RUN), str(spec_file), str(out)],
            cwd=ARTIFACTS, env=env, stdout=sink, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            process.wait(timeout=1200)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the {batch} engines ran past 20 min\n{tail(log)}")
        finally:
            stop(process)
    if not out.exists():
        pytest.fail(f"the {batch} engines wrote nothing (exit {process.returncode})\n"
                    f"{tail(log)}")
    print(f"{batch}: {len(spec['runs'])} engines in {time.monotonic() - started:.0f} s")
    results: dict[str, Any] = json.loads(out.read_text())
    return results


@pytest.fixture(scope="module")
def engines(node: EngineNode, vllm_python: Path) -> Callable[[int], dict[str, Any]]:
    """``engines(tp)``: every engine's outputs at that TP size (run once, on first use)."""

    def run(tp: int) -> dict[str, Any]:
        if tp not in node.runs:
            node.runs[tp] = run_engines(vllm_python, f"tp{tp}", {
                "prompts": [list(p) for p in PROMPTS],
                "max_tokens": MAX_TOKENS,
                "logprobs": TOP_LOGPROBS,
                "metrics_url": f"{node.url}/metrics",
                "runs": _engine_runs(node, tp),
            })
        return node.runs[tp]

    return run


def _outputs(results: dict[str, Any], name: str, tp: int) -> list[dict[str, Any]]:
    result = results.get(name)
    if result is None:
        pytest.fail(f"{name} at TP {tp} never ran (see {artifact(f'engines-tp{tp}.log')})")
    if "error" in result:
        pytest.fail(f"{name} at TP {tp} failed in the engine:\n{result['error'][-4000:]}")
    outputs: list[dict[str, Any]] = result["outputs"]
    return outputs


def _mode(url: str, pipeline: str, tp: int) -> str:
    response = httpx.get(
        f"{url}/v1/pipelines/{pipeline}/manifest", params={"tp_size": tp, "rank": 0}, timeout=30
    )
    response.raise_for_status()
    mode: str = response.json()["mode"]
    return mode


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_weightcache_engine_matches_vllms_own_loader(
    case: EngineCase, tp: int, node: EngineNode, engines: Callable[[int], dict[str, Any]]
) -> None:
    # The case must exercise the path it is named for: rank shards for the Llama family at
    # TP 2, full tensors (vLLM's own weight loaders slice) for the rest and at TP 1.
    assert _mode(node.url, case.name, tp) == (case.tp2_mode if tp == 2 else "full")
    results = engines(tp)
    expected = _outputs(results, f"{case.name}/vllm", tp)
    actual = _outputs(results, f"{case.name}/weightcache", tp)
    assert_same_outputs(expected, actual, f"{case.name} at TP {tp}")


@pytest.mark.parametrize("tp", [1, 2])
def test_pipeline_engine_takes_only_its_own_model(
    tp: int, node: EngineNode, engines: Callable[[int], dict[str, Any]]
) -> None:
    results = engines(tp)
    for model, case_name in PIPELINE_MODELS.items():
        expected = _outputs(results, f"{case_name}/vllm", tp)
        actual = _outputs(results, f"duo/{model}/weightcache", tp)
        assert_same_outputs(expected, actual, f"pipeline model {model} at TP {tp}")
        # Its own model's bytes and no more: what the single-model pipeline of the same
        # checkpoint needed at this TP size (the other model's weights stay on the node).
        alone = results[f"{case_name}/weightcache"]["bytes_served"]
        taken = results[f"duo/{model}/weightcache"]["bytes_served"]
        assert taken == alone, f"the engine of {model} at TP {tp} took {taken} bytes, " \
            f"its model alone is {alone}"


def test_launch_vllm_serve_answers_a_completion(
    node: EngineNode, engines: Callable[[int], dict[str, Any]],
    vllm_python: Path, tmp_path: Path,
) -> None:
    expected = _outputs(engines(1), f"{PIPELINE_MODELS['chat']}/vllm", 1)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "vllm"
    cli.write_text(f"#!{vllm_python}\n{VLLM_CLI.read_text()}")
    cli.chmod(0o755)
    port = free_port()
    command = [
        sys.executable, "-m", "clients.cli", "--url", node.url,
        "launch", "duo", "--model", "chat", "--tp-size", "1", "--",
        "vllm", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "4",
        "--enforce-eager", "--kv-cache-memory-bytes", str(32 << 20), "--seed", "0",
    ]
    env = {
        **engine_env(),
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "HOME": str(tmp_path),  # the launcher stages config under ~/.cache/weightcache
    }
    log = artifact("launch.log")
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/v1/models", process, log, 600)
        served = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        response = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "model": served,
            "prompt": list(PROMPTS[0]),
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
            "logprobs": 1,
            "return_tokens_as_token_ids": True,
        })
        assert response.status_code == 200, response.text
        choice = response.json()["choices"][0]
        tokens = [int(t.removeprefix("token_id:")) for t in choice["logprobs"]["tokens"]]
        assert tokens == expected[0]["tokens"], (
            f"vllm serve through weightcache launch generated {tokens}, "
            f"vLLM's loader {expected[0]['tokens']}"
        )
        # and detokenized by the checkpoint's tokenizer (vLLM decodes one token at a time: the
        # word-level decoder's spaces fall between calls)
        assert choice["text"].replace(" ", "") == "".join(f"t{t}" for t in tokens)
        # The launcher said what it did: warm, staged, the rank's weights from inside vLLM, and
        # (it supervises the engine) the moment the engine answered.
        said = wait_for_line(log, "weightcache: engine ready", process)
        for line in ("weightcache: duo warm after", "weightcache: staged",
                     "weightcache: rank 0/1 weights"):
            assert line in said, f"the launcher never said {line!r}:\n{tail(log)}"
    finally:
        stop(process)


def test_weightcache_load_holds_no_second_copy_of_the_weights(
    node: EngineNode, vllm_python: Path, tmp_path: Path
) -> None:
    """Inside each worker, a ``--load-format weightcache`` load needs the staging ring and a
    few MiB beyond the parameters it fills, not a second copy of the rank's weights.

    ``memprobe/sitecustomize.py`` measures every load in the workers (peak RSS above the start,
    parameters already resident); vLLM's own loader on the same checkpoint is measured too, for
    the record: its peak is the checkpoint pages it maps.
    """
    tp = 2
    model_dir = node.dirs[MEMORY_CASE.name]
    results = run_engines(vllm_python, "memory", {
        "prompts": [list(PROMPTS[0])],
        "max_tokens": 2,
        "logprobs": 1,
        "memprobe_dir": str(tmp_path),
        "runs": [
            {"name": "vllm", "model_dir": str(model_dir), "tp": tp},
            {"name": "weightcache", "model_dir": str(model_dir), "tp": tp,
             "load_format": "weightcache",
             "extra": {"pipeline": MEMORY_CASE.name, "url": node.url}},
        ],
    }, probe=True)
    for name in ("vllm", "weightcache"):
        if "error" in results[name]:
            pytest.fail(f"{name} failed in the engine:\n{results[name]['error'][-4000:]}")
    assert results["weightcache"]["outputs"] == results["vllm"]["outputs"]
    for name in ("vllm", "weightcache"):
        for load in results[name]["loads"]:
            print(f"TP {tp} {load['loader']} (pid {load['pid']}): {load['param_bytes'] / MiB:.0f} "
                  f"MiB of parameters, peak {load['extra_bytes'] / MiB:.1f} MiB above them")
    loads = results["weightcache"]["loads"]
    assert len(loads) == tp
    assert {load["loader"] for load in loads} == {"WeightcacheModelLoader"}
    for load in loads:
        assert load["param_bytes"] > 100 * MiB  # the rank is big enough to see a second copy
        assert load["extra_bytes"] <= RING_ALLOWANCE, (
            f"a weightcache load peaked {load['extra_bytes'] / MiB:.0f} MiB above the "
            f"{load['param_bytes'] / MiB:.0f} MiB of parameters it filled"
        )
