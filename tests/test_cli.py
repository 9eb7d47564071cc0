"""The ``weightcache`` CLI against a real node: register, status, pull, load, evict, delete."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from clients.cli import main
from clients.errors import EXIT_FAILURE, EXIT_REFUSED
from tests.fixtures.node_server import running_node
from tests.fixtures.tiny_llama import make_tiny_llama


def test_cli_round_trip(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=2)
    with running_node(data_dir=tmp_path / "data") as node:
        url = ["--url", node.url]
        model = f"llm=file://{source}"
        assert main([*url, "register", "tiny", "--model", model, "--tp", "1,2", "--wait"]) == 0
        assert "tiny: warm" in capsys.readouterr().out

        assert main([*url, "status", "tiny", "--json"]) == 0
        status = json.loads(capsys.readouterr().out)
        assert status["state"] == "warm"
        assert status["shards"] == {"1": "ready", "2": "ready"}

        assert main([*url, "status"]) == 0
        table = capsys.readouterr().out
        assert "tiny" in table
        assert "cache: warm" in table

        dest = tmp_path / "pulled"
        assert main([*url, "pull", "tiny", "--dest", str(dest)]) == 0
        capsys.readouterr()
        for path in source.iterdir():
            if path.suffix in (".json", ".safetensors"):
                pulled = (dest / path.name).read_bytes()
                assert hashlib.sha256(pulled).digest() == hashlib.sha256(path.read_bytes()).digest()

        assert main([*url, "load", "tiny", "--tp-size", "2", "--rank", "1", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["tp_size"] == 2
        assert report["rank"] == 1
        assert report["bytes_delivered"] > 0
        assert main([*url, "load", "tiny", "--verify"]) == 0
        assert "GB/s" in capsys.readouterr().out

        assert main([*url, "evict", "tiny"]) == 0
        assert "tiny: evicted" in capsys.readouterr().out
        assert main([*url, "load", "tiny"]) == EXIT_REFUSED
        assert "not_warm" in capsys.readouterr().err

        assert main([*url, "delete", "tiny"]) == 0
        assert main([*url, "status", "tiny"]) == EXIT_REFUSED
        assert "not_found" in capsys.readouterr().err
    assert load_file(str(source / "model.safetensors"))


def test_cli_reports_a_failed_warm(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with running_node(data_dir=tmp_path / "data") as node:
        missing = f"llm=file://{tmp_path / 'nowhere'}"
        code = main(["--url", node.url, "register", "gone", "--model", missing, "--wait"])
        assert code == 1
        assert "origin_not_found" in capsys.readouterr().err


def test_cli_rejects_bad_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["register", "x", "--model", "no-equals-sign"])
    assert "NAME=SOURCE" in capsys.readouterr().err


def test_launch_arguments_after_the_separator_belong_to_the_engine() -> None:
    from clients.cli import parse_args

    args = parse_args(["launch", "chat", "--tp-size", "2", "--", "vllm", "serve", "--port", "1"])
    assert args.id == "chat"
    assert args.tp_size == 2
    assert args.command == ["vllm", "serve", "--port", "1"]
    args = parse_args(["launch", "--tp-size", "4", "chat", "--", "vllm", "serve"])
    assert args.tp_size == 4
    assert args.command == ["vllm", "serve"]


def test_the_cli_imports_server_code_only_inside_serve_and_demo() -> None:
    import subprocess
    import sys

    code = (
        "import sys, clients.cli\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', "
        "'uvicorn', 'aiohttp', 'diskcache', 'boto3', 'botocore', 'aiobotocore', 'cache_node'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_a_file_outside_the_destination_is_refused(tmp_path: Path) -> None:
    from clients.client import Client
    from clients.errors import ClientError
    from clients.pull import fetch_file

    with Client("http://127.0.0.1:9") as client:  # refused before any request
        for relative in ("../escape", "/etc/passwd", "a/../../b"):
            with pytest.raises(ClientError, match="unsafe path"):
                fetch_file(client, tmp_path / "dest", relative, blob="0" * 64, size=0)
    assert not (tmp_path / "escape").exists()


def test_unreachable_node_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--url", "http://127.0.0.1:9", "status"]) == EXIT_FAILURE
    assert "unreachable: cannot reach the node" in capsys.readouterr().err


def test_status_fits_a_100_column_terminal(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    source = make_tiny_llama(tmp_path / "src")
    with running_node(data_dir=tmp_path / "data", local_roots=[tmp_path]) as node:
        url = ["--url", node.url]
        for name in ("a-pipeline-with-a-rather-long-name-for-a-terminal", "b"):
            assert main([*url, "register", name, "--model", f"llm=file://{source}", "--tp", "1,2",
                         "--wait"]) == 0
        missing = f"llm=file://{tmp_path / 'nowhere'}"
        main([*url, "register", "failed-one", "--model", missing, "--wait"])
        env = {**os.environ, "COLUMNS": "100", "PYTHONPATH": str(Path(__file__).parents[1])}
        result = subprocess.run([sys.executable, "-m", "clients.cli", *url, "status"],
                                capture_output=True, text=True, env=env, check=True, timeout=60)
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 100, result.stdout
    assert sum("cache: warm" in line for line in lines) == 2
    assert any("failed-one:" in line and "origin_not_found" in line for line in lines)
    assert not any(" hot" in line for line in lines)  # registered, never used: not hot
