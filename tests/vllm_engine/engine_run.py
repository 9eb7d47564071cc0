"""Run vLLM engines one after another in this process; write each one's greedy outputs as JSON.

Executed by the vLLM venv's Python (``.venv-vllm``), never imported by pytest: the test suite runs
in the project venv and talks to this script through files. ``engine_run.py SPEC OUT`` reads a
JSON spec ``{"prompts": [[ids]], "max_tokens": N, "logprobs": K, "runs": [{"name", "model_dir",
"load_format", "extra", "tp"}], "metrics_url": URL?}`` and writes ``{name: {"outputs": [...],
"bytes_served": N} | {"error": text}}`` (``bytes_served``: what the cache node sent during the run,
read from its ``/metrics`` when ``metrics_url`` is given; ``loads``: each worker's peak memory
during its load, with ``"memprobe_dir": DIR`` and ``memprobe/`` on ``PYTHONPATH``).

Engines in one process share one import of vLLM (most of a CPU engine's start-up time); each is
torn down (distributed groups included) before the next starts. A run that fails records its
traceback and the next run still starts, so one broken case does not hide the others.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


def run_one(run: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams

    probe = None
    if spec.get("memprobe_dir"):  # memprobe/sitecustomize.py appends each load's peak here
        probe = Path(spec["memprobe_dir"]) / f"{run['name'].replace('/', '-')}.jsonl"
        probe.unlink(missing_ok=True)
        os.environ["WEIGHTCACHE_MEMPROBE_OUT"] = str(probe)  # workers spawned below inherit it
    started = time.monotonic()
    llm = LLM(
        model=run["model_dir"],
        load_format=run.get("load_format", "auto"),
        model_loader_extra_config=run.get("extra") or {},
        tensor_parallel_size=run.get("tp", 1),
        # float32 on both sides: the two loaders must give bit-identical weights, so the
        # outputs are compared exactly (tokens) or to a tight tolerance (log-probabilities).
        dtype="float32",
        max_model_len=64,
        max_num_seqs=4,
        enforce_eager=True,
        kv_cache_memory_bytes=32 << 20,  # per worker; the default reserves GiBs
        seed=0,
        distributed_executor_backend="mp" if run.get("tp", 1) > 1 else None,
    )
    ready = time.monotonic()
    if run.get("ready_file"):  # the engine is ready: captures may upload now
        Path(run["ready_file"]).touch()
    try:
        params = SamplingParams(
            temperature=0.0,
            max_tokens=spec["max_tokens"],
            logprobs=spec["logprobs"],
            ignore_eos=True,
            detokenize=False,
        )
        prompts: list[Any] = [{"prompt_token_ids": ids} for ids in spec["prompts"]]
        results = llm.generate(prompts, params, use_tqdm=False)
        outputs = []
        for generated in results:
            completion = generated.outputs[0]
            outputs.append({
                "tokens": list(completion.token_ids),
                "logprobs": [
                    {str(token): entry.logprob for token, entry in step.items()}
                    for step in (completion.logprobs or [])
                ],
            })
        result: dict[str, Any] = {
            "outputs": outputs,
            "loads": _probed_loads(probe),
            "start_s": round(ready - started, 2),
            "generate_s": round(time.monotonic() - ready, 2),
        }
        if run.get("await_captures"):  # before the workers (and their uploads) go
            result["captures"] = _await_captures(**run["await_captures"])
        return result
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        _teardown()


def _await_captures(url: str, pipeline: str, count: int, timeout_s: float = 120) -> Any:
    """The pipeline's captures once ``count`` of them are there (the workers upload them in
    the background); what there is at ``timeout_s``."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        listed = httpx.get(f"{url}/v1/pipelines/{pipeline}/captures", timeout=10).json()
        captures = listed.get("captures", [])
        if len(captures) >= count or time.monotonic() > deadline:
            return captures
        time.sleep(0.2)


def load_reports(url: str, pipeline: str, since: float) -> list[dict[str, Any]]:
    """The load reports the node recorded for ``pipeline`` since ``since`` (oldest first)."""
    import httpx

    loads = httpx.get(f"{url}/v1/pipelines/{pipeline}/loads", timeout=10).json()["loads"]
    return sorted((r for r in loads if (r.get("at") or 0) >= since),
                  key=lambda r: (r.get("at") or 0, r.get("rank", 0)))


def _probed_loads(probe: Path | None) -> list[dict[str, Any]] | None:
    if probe is None:
        return None
    if not probe.exists():
        raise RuntimeError(f"the memory probe recorded no load in {probe}")
    return [json.loads(line) for line in probe.read_text().splitlines()]


def _teardown() -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    gc.collect()
    cleanup_dist_env_and_memory()


def bytes_served(metrics_url: str | None) -> float | None:
    """The node's ``weightcache_bytes_served_total`` counter, or None without a node."""
    if not metrics_url:
        return None
    import httpx

    text = httpx.get(metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith("weightcache_bytes_served_total"):
            return float(line.split()[-1])
    raise RuntimeError(f"{metrics_url} has no weightcache_bytes_served_total")


def run_and_record(run: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    """One run: its result, or its traceback; with the node's bytes and load reports."""
    print(f"engine_run: {run['name']} starting", file=sys.stderr, flush=True)
    before = bytes_served(spec.get("metrics_url"))
    since = time.time()
    try:
        result = run_one(run, spec)
        after = bytes_served(spec.get("metrics_url"))
        if before is not None and after is not None:
            result["bytes_served"] = after - before
        if run.get("reports"):
            result["reports"] = load_reports(run["reports"]["url"], run["reports"]["pipeline"],
                                             since)
    except Exception:
        result = {"error": traceback.format_exc()}
        _teardown()
    print(f"engine_run: {run['name']} done", file=sys.stderr, flush=True)
    return result


def serve() -> int:
    """``engine_run.py --serve``: one JSON request a line on stdin, ``{"run": RUN, "spec":
    SPEC, "out": PATH}`` (or ``{"quit": true}``); each result is written to its ``out`` whole,
    so a test can act between engines (corrupt a blob, register again) with vLLM imported once.
    """
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("quit"):
            break
        result = run_and_record(request["run"], request["spec"])
        out = Path(request["out"])
        temp = out.with_name(f".{out.name}.tmp")
        temp.write_text(json.dumps(result))
        temp.replace(out)
    return 0


def main(argv: list[str]) -> int:
    if argv[1:] == ["--serve"]:
        return serve()
    spec = json.loads(Path(argv[1]).read_text())
    out = Path(argv[2])
    report: dict[str, Any] = {}
    for run in spec["runs"]:
        report[run["name"]] = run_and_record(run, spec)
        out.write_text(json.dumps(report))  # written after every run: a crash keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
