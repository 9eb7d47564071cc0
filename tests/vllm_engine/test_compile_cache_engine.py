"""The engine's compile cache with the weights, on a real vLLM engine (the CPU build).

Two ``weightcache launch ... -- vllm serve`` of one pipeline with compilation on (no
``--enforce-eager``), each as on a fresh host: no compile cache on the machine (the first
launch's is deleted, Inductor's own cache is a new directory each time). The first compiles
and uploads its compile cache once the engine answers; the second fetches it before the engine
starts, and is ready sooner; both answer the same completion with the same tokens and
log-probabilities. The figures (the launcher's engine-ready times, and vLLM's own time for its
profile, KV cache, compile and warm-up) go to ``test-artifacts/vllm/compile_cache.json``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.node_server import free_port
from tests.vllm_engine.harness import (
    LOGPROB_TOLERANCE,
    MAX_TOKENS,
    REPO,
    VLLM_CLI,
    artifact,
    engine_env,
    machine,
    node_process,
    register,
    stop,
    tail,
    wait_for_line,
    wait_http,
    wait_warm,
)
from tests.vllm_engine.models import PROMPTS, EngineCase, make_case

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(1800)]

CASE = EngineCase("gpt2-compiled", "gpt2", 1001, tie=True)
PIPELINE = "compiled"
_READY = re.compile(r"weightcache: engine ready \(.*\) ([0-9.]+) s after launch")
#: vLLM's own account of the part of its start a compile cache shortens.
_INIT = re.compile(r"init engine \(profile, create kv cache, warmup model\) took ([0-9.]+) s")
#: What the launcher says once the engine answered and its compile cache was dealt with.
_SETTLED = ("weightcache: compile cache: uploaded",
            "weightcache: compile cache: the engine started from the node's",
            "weightcache: compile cache: not uploaded")


@dataclass
class Launch:
    ready_s: float
    init_s: float
    tokens: list[int]
    top_logprobs: list[dict[str, float]]
    log: str


def _launch(number: int, *, url: str, bin_dir: Path, home: Path, scratch: Path) -> Launch:
    port = free_port()
    command = [
        sys.executable, "-m", "clients.cli", "--url", url,
        "launch", PIPELINE, "--tp-size", "1", "--",
        "vllm", "serve", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "64", "--max-num-seqs", "4",
        "--kv-cache-memory-bytes", str(32 << 20), "--seed", "0",
    ]
    env = engine_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        HOME=str(home),  # the same staged model path in both: vLLM hashes it
        TORCHINDUCTOR_CACHE_DIR=str(scratch / f"inductor-{number}"),  # nothing of Inductor's
    )
    log = artifact(f"compile-cache-launch-{number}.log")
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/v1/models", process, log, 900)
        served = httpx.get(f"{base}/v1/models", timeout=30).json()["data"][0]["id"]
        response = httpx.post(f"{base}/v1/completions", timeout=300, json={
            "model": served, "prompt": list(PROMPTS[0]), "max_tokens": MAX_TOKENS,
            "temperature": 0, "ignore_eos": True, "logprobs": 5,
            "return_tokens_as_token_ids": True,
        })
        assert response.status_code == 200, response.text
        logprobs = response.json()["choices"][0]["logprobs"]
        said = wait_for_line(log, _SETTLED, process, timeout_s=300)
    finally:
        stop(process)
    ready, init = _READY.search(said), _INIT.search(said)
    assert ready is not None, tail(log)
    assert init is not None, tail(log)
    return Launch(
        ready_s=float(ready.group(1)),
        init_s=float(init.group(1)),
        tokens=[int(t.removeprefix("token_id:")) for t in logprobs["tokens"]],
        top_logprobs=logprobs["top_logprobs"],
        log=said,
    )


def test_a_second_launch_reuses_the_compile_cache(
    tmp_path_factory: pytest.TempPathFactory, vllm_python: Path
) -> None:
    root = tmp_path_factory.mktemp("compile-sources")
    source = make_case(CASE, root / CASE.name)
    scratch = tmp_path_factory.mktemp("compile-launch")
    home, bin_dir = scratch / "home", scratch / "bin"
    bin_dir.mkdir()
    cli = bin_dir / "vllm"
    cli.write_text(f"#!{vllm_python}\n{VLLM_CLI.read_text()}")
    cli.chmod(0o755)
    with node_process(tmp_path_factory.mktemp("compile-node"), root,
                      "compile-cache-node.log") as (url, _):
        register(url, PIPELINE, {"llm": source}, tp_sizes=(1,))
        wait_warm(url, PIPELINE)
        first = _launch(1, url=url, bin_dir=bin_dir, home=home, scratch=scratch)
        assert "compile cache: none for this engine yet" in first.log
        assert "compile cache: uploaded" in first.log
        listed = httpx.get(f"{url}/v1/pipelines/{PIPELINE}/captures", timeout=30).json()
        (cache,) = listed["captures"]
        assert (cache["key"]["kind"], cache["key"]["tp_size"]) == ("compile_cache", 1)
        status = httpx.get(f"{url}/v1/pipelines/{PIPELINE}", timeout=30).json()
        assert status["bytes_total"] == sum(m["bytes_total"] for m in status["models"]) + \
            cache["bytes"]  # charged to the pipeline
        # a fresh host: no compile cache on the machine, the node's is all there is
        local = home / ".cache" / "weightcache" / "launch" / f".{PIPELINE}.vllm-cache"
        assert (local / "torch_compile_cache").is_dir()
        shutil.rmtree(local)
        started = time.monotonic()
        second = _launch(2, url=url, bin_dir=bin_dir, home=home, scratch=scratch)
        assert "compile cache: fetched" in second.log
        assert "compile cache: the engine started from the node's" in second.log
        print(f"second launch measured in {time.monotonic() - started:.0f} s")
    assert second.tokens == first.tokens
    for step, (want, got) in enumerate(zip(first.top_logprobs, second.top_logprobs,
                                           strict=True)):
        assert want.keys() == got.keys(), step
        for token, logprob in want.items():
            assert got[token] == pytest.approx(logprob, abs=LOGPROB_TOLERANCE), (step, token)
    ratio = second.ready_s / first.ready_s
    figures: dict[str, Any] = {
        "benchmark": "compile_cache",
        **machine(),
        "first_launch_ready_s": first.ready_s,
        "second_launch_ready_s": second.ready_s,
        "ready_ratio": round(ratio, 3),
        "first_engine_init_s": first.init_s,
        "second_engine_init_s": second.init_s,
        "engine_init_ratio": round(second.init_s / first.init_s, 3),
        "compile_cache_bytes": cache["bytes"],
        "model": CASE.name,
        "engine": f"vllm {cache['key']['engine_version']} ({cache['key']['device']})",
    }
    artifact("compile_cache.json").write_text(json.dumps(figures, indent=1))
    print(f"engine ready {first.ready_s:.1f} s after the first launch (compiling), "
          f"{second.ready_s:.1f} s after the second (compile cache fetched): {ratio:.2f}; "
          f"vLLM's init (profile, KV cache, compile and warm-up) {first.init_s:.1f} s, then "
          f"{second.init_s:.1f} s")
    # The compile is what the cache saves; the rest of a start (three processes importing
    # vLLM) swings with the machine's load, so the whole ready time is recorded, not bound.
    assert second.init_s < 0.75 * first.init_s
