"""``weightcache launch``: a warm pipeline's config staged locally and the engine command built."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from loader.errors import LaunchError
from loader.launcher import launch, launch_command
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama


def test_launch_command_adds_model_dir_and_loader_flags(tmp_path: Path) -> None:
    argv = launch_command(
        ["vllm", "serve", "--port", "9000"],
        pipeline="chat",
        model_dir=tmp_path,
        tp_size=2,
        url="http://cache:8470",
    )
    assert argv[:3] == ["vllm", "serve", str(tmp_path)]
    assert argv[argv.index("--load-format") + 1] == "weightcache"
    assert argv[argv.index("--tensor-parallel-size") + 1] == "2"
    options = json.loads(argv[argv.index("--model-loader-extra-config") + 1])
    assert options == {"pipeline": "chat", "url": "http://cache:8470"}
    kept = launch_command(
        ["vllm", "serve", "/m", "--tensor-parallel-size=4"],
        pipeline="chat", model_dir=tmp_path, tp_size=2, url="u",
    )
    assert kept[2] == "/m"
    assert "--tensor-parallel-size" not in kept
    chosen = launch_command(
        ["vllm", "serve"], pipeline="two", model_dir=tmp_path, tp_size=1, url="u", model="llm"
    )
    options = json.loads(chosen[chosen.index("--model-loader-extra-config") + 1])
    assert options == {"pipeline": "two", "url": "u", "model": "llm"}


def test_launch_runs_the_engine_on_a_warm_pipeline(tmp_path: Path) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=2)
    engine = tmp_path / "engine.py"
    record = tmp_path / "argv.json"
    engine.write_text(
        "import json, os, sys\n"
        f"json.dump({{'argv': sys.argv[1:], 'url': os.environ['WEIGHTCACHE_URL']}}, "
        f"open({str(record)!r}, 'w'))\n"
    )
    with running_node(data_dir=tmp_path / "data") as node, node.client() as c:
        body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [1, 2]}
        c.put("/v1/pipelines/chat", json=body)
        wait_for_state(c, "chat", {"warm"})
        code = launch(
            "chat",
            tp_size=2,
            command=[sys.executable, str(engine), "serve"],
            url=node.url,
            root=tmp_path / "launch",
            exec_=False,
        )
    assert code == 0
    seen = json.loads(record.read_text())
    model_dir = Path(seen["argv"][1])
    assert seen["argv"][0] == "serve"
    assert json.loads((model_dir / "config.json").read_text())["model_type"] == "llama"
    assert not list(model_dir.glob("*.safetensors"))  # weights stream from the cache, not disk
    assert seen["url"] == node.url


_ENGINE_WITH_HEALTH = """
import http.server, json, os, sys
argv = sys.argv[1:]
json.dump({"argv": argv, "url": os.environ["WEIGHTCACHE_URL"]}, open(sys.argv[0] + ".json", "w"))
port = int(argv[argv.index("--port") + 1])

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
        self.server.answered = True

    def log_message(self, *args):
        pass

server = http.server.HTTPServer(("127.0.0.1", port), Health)
server.answered = False
while not server.answered:
    server.handle_request()
"""


def test_launch_prints_the_cold_start_and_serves_one_model_of_two(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tests.fixtures.node_server import free_port

    first = make_tiny_llama(tmp_path / "asr", num_kv_heads=2, vocab_size=1001)
    second = make_tiny_llama(tmp_path / "llm", num_kv_heads=2, vocab_size=2003)
    engine = tmp_path / "engine.py"
    engine.write_text(_ENGINE_WITH_HEALTH)
    port = free_port()
    with running_node(data_dir=tmp_path / "data") as node, node.client() as c:
        body = {
            "models": [
                {"name": "asr", "source": f"file://{first}"},
                {"name": "llm", "source": f"file://{second}"},
            ],
            "tp_sizes": [1],
        }
        c.put("/v1/pipelines/two", json=body)
        wait_for_state(c, "two", {"warm"})
        command = [sys.executable, str(engine), "serve", "--port", str(port)]
        with pytest.raises(LaunchError, match=r"models \['asr', 'llm'\].*--model"):
            launch("two", tp_size=1, command=command, url=node.url, root=tmp_path / "l")
        code = launch(
            "two", tp_size=1, command=command, url=node.url, root=tmp_path / "l", model="llm"
        )
    assert code == 0
    seen = json.loads((tmp_path / "engine.py.json").read_text())
    argv = seen["argv"]
    options = json.loads(argv[argv.index("--model-loader-extra-config") + 1])
    # the workers' engine shard sets wait for this file: created once the engine answered,
    # gone when the launch ends
    ready_file = Path(options.pop("ready_file"))
    assert ready_file.name.startswith(".llm.ready-")
    assert not ready_file.exists()
    assert options == {"pipeline": "two", "url": node.url, "model": "llm"}
    model_dir = Path(argv[1])
    assert json.loads((model_dir / "config.json").read_text())["vocab_size"] == 2003
    said = capsys.readouterr().err
    for stage in ("waiting for two to be warm", "two warm after", "staged", "run ",
                  f"engine ready (http://127.0.0.1:{port}/health answers)"):
        assert stage in said, (stage, said)


def test_launch_without_a_command_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="needs the engine command"):
        launch("chat", tp_size=1, command=[], url="http://127.0.0.1:9", root=tmp_path)
    for argv in (["launch", "chat"], ["launch", "chat", "--"]):
        result = subprocess.run(
            [sys.executable, "-m", "clients.cli", *argv],
            capture_output=True, text=True, timeout=60, check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )
        assert result.returncode == 2, result
        assert "launch needs the engine command after --" in result.stderr
        assert "Traceback" not in result.stderr


def test_launch_help_says_what_it_does() -> None:
    from clients.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    text = sub.choices["launch"].format_help()
    for needed in ("vLLM", "--load-format weightcache", "--model-loader-extra-config",
                   "--tensor-parallel-size", "--model", "example", "-- vllm serve",
                   "engine ready", "GB/s"):
        assert needed in text, needed
