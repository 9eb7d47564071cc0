"""``weightcache launch``: vLLM on a pipeline of the cache (its help text and its handler)."""

from __future__ import annotations

import argparse

__all__ = ["LAUNCH_HELP", "cmd_launch"]

#: ``weightcache launch --help``: what the launcher does to the command, and examples.
LAUNCH_HELP = """\
Start vLLM on a pipeline of the cache: weights stream from the cache into vLLM's parameters.

Waits until the pipeline is warm (re-warming it if it was evicted), stages its small files
(config.json, tokenizer) in a local directory, then runs the engine command given after --
with these additions (a flag the command already has is left as it is):

  MODEL_DIR                            after `serve`, when the command names no model
  --load-format weightcache            vLLM loads weights through weightcache's plugin
  --model-loader-extra-config JSON     {"pipeline": ID, "url": URL, "model": NAME}
                                       ("model" only with --model)
  --tensor-parallel-size N             from --tp-size

Each vLLM worker then streams only its own rank's shard (cut in vLLM's layout) into its
parameters. The token goes to the engine as $WEIGHTCACHE_TOKEN, never on its command line.

Engine shard sets: where a rank's load needed vLLM's weight loaders (architectures outside
the Llama family at TP > 1, quantised checkpoints), each worker uploads its final tensors once
the engine answers; later starts of the same key replay them. Compile cache: with compilation
on (no --enforce-eager), the engine's compile cache for this pipeline is fetched into
$VLLM_CACHE_ROOT before the engine starts (default: a directory beside the staged files) and
uploaded after the first start that compiled something (at most --compile-cache-limit MiB).

It prints the cold start: waiting for warm, staging files, each rank's weights (bytes,
seconds, GB/s, printed by the plugin inside vLLM), and engine ready (when /health answers).

examples:
  weightcache launch chat-8b --tp-size 2 -- vllm serve --port 8000
  weightcache launch asr-llm --model llm -- vllm serve     # one model of a pipeline of two
"""


def cmd_launch(args: argparse.Namespace) -> int:
    """Run the engine command on the pipeline's weights; its exit code is the launch's."""
    from loader.launcher import launch

    code: int = launch(
        args.id,
        tp_size=args.tp_size,
        command=args.command,
        url=args.url,
        token=args.token,
        model=args.model,
        exec_=args.exec_,
        compile_cache_limit=args.compile_cache_limit << 20,
    )
    return code
