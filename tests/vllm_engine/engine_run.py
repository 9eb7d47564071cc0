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
        for result in results:
            completion = result.outputs[0]
            outputs.append({
                "tokens": list(completion.token_ids),
                "logprobs": [
                    {str(token): entry.logprob for token, entry in step.items()}
                    for step in (completion.logprobs or [])
                ],
            })
        return {
            "outputs": outputs,
            "loads": _probed_loads(probe),
            "start_s": round(ready - started, 2),
            "generate_s": round(time.monotonic() - ready, 2),
        }
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
        _teardown()


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


def main(argv: list[str]) -> int:
    spec = json.loads(Path(argv[1]).read_text())
    out = Path(argv[2])
    report: dict[str, Any] = {}
    for run in spec["runs"]:
        print(f"engine_run: {run['name']} starting", file=sys.stderr, flush=True)
        before = bytes_served(spec.get("metrics_url"))
        try:
            report[run["name"]] = run_one(run, spec)
            after = bytes_served(spec.get("metrics_url"))
            if before is not None and after is not None:
                report[run["name"]]["bytes_served"] = after - before
        except Exception:
            report[run["name"]] = {"error": traceback.format_exc()}
            _teardown()
        print(f"engine_run: {run['name']} done", file=sys.stderr, flush=True)
        out.write_text(json.dumps(report))  # written after every run: a crash keeps the rest
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
