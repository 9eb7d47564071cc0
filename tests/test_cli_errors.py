"""Every user error of the CLI ends in one clear line and a documented exit code, never a traceback.

The CLI runs as users run it: the ``weightcache`` module in a subprocess, its stderr read whole.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from clients.errors import (
    EXIT_FAILURE,
    EXIT_REFUSED,
    EXIT_USAGE,
    ApiError,
    AuthError,
    ConflictError,
    ForbiddenError,
    InsufficientStorageError,
    NotFoundError,
    NotWarmError,
    RateLimitedError,
    ServerError,
    UsageError,
    WarmFailed,
    raise_for_status,
)
from loader import errors as loader_errors
from tests.fixtures.node_server import running_node

ROOT = Path(__file__).parents[1]


def weightcache(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("WEIGHTCACHE_URL", None)
    return subprocess.run([sys.executable, "-m", "clients.cli", *argv], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)


def assert_one_clear_line(result: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    """The command ended with ``code`` and said why in exactly one line, ``error: CODE: ...``."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    for word in words:
        assert word in lines[0], result.stderr


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["load", "p", "--device", "tpu"], ["--device", "tpu"]),
        (["load", "p", "--device", "cuda:0"], ["--device cuda:0", "no cuda device"]),
        (["load", "p", "--device", "nonsense:x"], ["--device"]),
        (["launch", "p"], ["launch needs the engine command", "vllm serve"]),
        (["launch", "p", "--"], ["launch needs the engine command", "launch --help"]),
        (["status", "--", "x"], ["unexpected arguments after --"]),
        (["serve", "--capacity", "10XB", "--data-dir", "/nonexistent/x"], ["--capacity"]),
        (["register", "p", "--model", "no-equals"], ["NAME=SOURCE"]),
        (["register", "p", "--model", "m=s3://b/k", "--tp", "x"], ["--tp"]),
        (["no-such-command"], ["invalid choice"]),
        ([], ["required"]),
    ],
)
def test_usage_errors(argv: list[str], words: list[str]) -> None:
    if argv[:3] == ["load", "p", "--device"] and argv[3].startswith("cuda"):
        import torch

        if torch.cuda.is_available():  # the case is about a machine without CUDA
            argv = ["load", "p", "--device", f"cuda:{torch.cuda.device_count()}"]
            words = ["--device"]
    assert_one_clear_line(weightcache(*argv), EXIT_USAGE, *words)


def test_version() -> None:
    result = weightcache("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("weightcache ")
    assert len(result.stdout.splitlines()) == 1
    assert not result.stderr


def test_help_documents_the_exit_codes() -> None:
    for argv in (["--help"], ["load", "--help"]):
        result = weightcache(*argv)
        assert result.returncode == 0
        assert "exit codes:" in result.stdout
        assert "refused by the node" in result.stdout


def test_url_and_token_before_or_after_the_subcommand(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text('{"tok-a": "team-a"}')
    with running_node(data_dir=tmp_path / "data", tokens_file=tokens) as node:
        for argv in (
            ["--url", node.url, "--token", "tok-a", "status"],
            ["status", "--url", node.url, "--token", "tok-a"],
            ["--url", node.url, "status", "--token", "tok-a"],
        ):
            result = weightcache(*argv)
            assert result.returncode == 0, (argv, result.stderr)
        refused = weightcache("status", "--url", node.url, "--token", "wrong")
        assert_one_clear_line(refused, EXIT_REFUSED, "unauthorized")
        missing = weightcache("status", "nope", "--url", node.url, "--token", "tok-a")
        assert_one_clear_line(missing, EXIT_REFUSED, "not_found")


@pytest.mark.parametrize("command", [["status"], ["load", "p"], ["pull", "p", "--dest", "d"]])
def test_unreachable_node_is_a_failure(command: list[str]) -> None:
    result = weightcache(*command, "--url", "http://127.0.0.1:9")
    assert_one_clear_line(result, EXIT_FAILURE, "unreachable", "127.0.0.1:9")


def test_a_refusing_node_is_one_line_and_exit_3(tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps({
        "tokens": {"tok-a": "team-a"},
        "tenants": {"team-a": {"sources": [f"file://{models}/"]}},
    }))
    with running_node(data_dir=tmp_path / "data", tokens_file=tokens) as node:
        connect = ["--url", node.url, "--token", "tok-a"]
        # a permanent failure (the source is not there), so the pipeline stays not warm
        gone = weightcache(*connect, "register", "gone", "--model",
                           f"llm=file://{models / 'missing'}", "--wait")
        assert gone.returncode == EXIT_FAILURE, gone.stderr
        for argv, words in (
            (["status", "--token", "wrong"], ["unauthorized"]),  # 401
            (["register", "p", "--model", f"llm=file://{tmp_path / 'other'}"],  # 403
             ["source_not_allowed"]),
            (["load", "nope"], ["not_found", "nope"]),  # 404
            (["load", "gone"], ["origin_not_found", "gone"]),  # 409 not_warm: why it is not
        ):
            result = weightcache(*connect, *argv)
            assert_one_clear_line(result, EXIT_REFUSED, *words)


def _answer(status: int, code: str = "", **extra: object) -> httpx.Response:
    body = {"error": {"code": code, "message": "m", **extra}} if code else {"detail": "x"}
    return httpx.Response(status, json=body, request=httpx.Request("GET", "http://n/x"))


@pytest.mark.parametrize(
    ("status", "code", "cls"),
    [
        (401, "unauthorized", AuthError),
        (403, "source_not_allowed", ForbiddenError),
        (404, "not_found", NotFoundError),
        (409, "not_warm", NotWarmError),
        (409, "leased", ConflictError),
        (429, "too_many_streams", RateLimitedError),
        (507, "insufficient_storage", InsufficientStorageError),
        (500, "internal", ServerError),
        (502, "", ServerError),
        (400, "invalid_input", ApiError),
    ],
)
def test_one_mapping_from_answers_to_errors(
    status: int, code: str, cls: type[ApiError]
) -> None:
    with pytest.raises(cls) as caught:
        raise_for_status(_answer(status, code, state="evicted"), context="ctx")
    assert type(caught.value) is cls
    assert caught.value.status == status
    assert caught.value.message.startswith("ctx: ")
    expected = EXIT_FAILURE if status >= 500 and status != 507 else EXIT_REFUSED
    assert caught.value.exit_code == expected


def test_the_loader_raises_the_same_classes() -> None:
    # one tree: the loader's names are the client's classes, not look-alikes
    assert loader_errors.NotWarmError is NotWarmError
    assert loader_errors.ServerError is ServerError
    assert issubclass(loader_errors.LaunchError, UsageError)
    assert WarmFailed.exit_code == EXIT_FAILURE
    with pytest.raises(NotWarmError) as caught:
        raise_for_status(_answer(409, "not_warm", state="cold"))
    assert caught.value.state == "cold"


def test_a_data_port_in_use_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = weightcache("serve", "--data-dir", str(tmp_path / "d"), "--port", "0",
                             "--data-port", str(port), "--data-workers", "1")
    assert_one_clear_line(result, EXIT_FAILURE, "data plane", str(port), "--data-port")


def test_every_client_side_error_class_is_in_an_errors_module() -> None:
    # One tree per package, drawn in its errors.py: an error class defined anywhere else in
    # clients/ or loader/ would be a second world (a look-alike NotWarmError, say).
    defined: dict[str, list[str]] = {}
    for package in ("clients", "loader"):
        for path in sorted((ROOT / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ClassDef) and node.name.endswith(
                    ("Error", "Failed", "Mismatch")
                ):
                    defined.setdefault(node.name, []).append(f"{package}/{path.name}")
    assert defined
    for name, where in defined.items():
        assert len(where) == 1, (name, where)
        assert where[0].endswith("/errors.py"), (name, where)
