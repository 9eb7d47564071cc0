"""``weightcache launch``: a warm pipeline's config staged locally and the engine command built."""

from __future__ import annotations

import json
import sys
from pathlib import Path

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
    assert kept[2] == "/m" and "--tensor-parallel-size" not in kept


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
