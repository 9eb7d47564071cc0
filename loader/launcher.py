"""``weightcache launch ID -- vllm serve [ARGS]``: the thin vLLM launcher.

It waits until the pipeline is warm (re-warming it if it was evicted), puts the pipeline's small
files (config, tokenizer) in a local directory for vLLM's front end, and runs the command with
``--load-format weightcache`` and the loader's options, so every worker streams its own rank's
weights from the cache. Weights never touch the local disk.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from clients.client import Client, default_token, default_url
from clients.errors import raise_for_status

_BLOCK = 1 << 20


def launch_command(
    command: Sequence[str],
    *,
    pipeline: str,
    model_dir: Path,
    tp_size: int,
    url: str,
    model: str | None = None,
) -> list[str]:
    """The command vLLM runs: ``command`` with the model dir and loader flags added.

    ``vllm serve`` gets ``model_dir`` as its model unless one is given; flags the user already
    passed are kept as they are.
    """
    if not command:
        raise ValueError("launch needs a command after --, e.g. -- vllm serve")
    argv = list(command)
    if "serve" in argv:
        at = argv.index("serve") + 1
        if at == len(argv) or argv[at].startswith("-"):
            argv.insert(at, str(model_dir))
    options: dict[str, object] = {"pipeline": pipeline, "url": url}
    if model is not None:
        options["model"] = model
    flags = {
        "--load-format": "weightcache",
        "--model-loader-extra-config": json.dumps(options),
        "--tensor-parallel-size": str(tp_size),
    }
    for flag, value in flags.items():
        if not any(a == flag or a.startswith(f"{flag}=") for a in argv):
            argv += [flag, value]
    return argv


def stage_model_dir(client: Client, pipeline: str, *, tp_size: int, root: Path) -> Path:
    """Write the pipeline's non-weight files (config, tokenizer) under ``root``; returns it."""
    manifest = client.manifest(pipeline, tp_size=tp_size, rank=0)
    target = root / pipeline
    for file in manifest.files:
        path = (target / file.path).resolve()
        if not path.is_relative_to(target.resolve()):
            raise ValueError(f"unsafe path {file.path!r} in the manifest")
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{path.name}.tmp")
        with client.http.stream("GET", f"/v1/blobs/{file.blob}") as response:
            raise_for_status(response)
            with open(temp, "wb") as out:
                for data in response.iter_raw(_BLOCK):
                    out.write(data)
        os.replace(temp, path)
    return target


def launch(
    pipeline: str,
    *,
    tp_size: int,
    command: Sequence[str],
    url: str | None = None,
    token: str | None = None,
    root: Path | None = None,
    exec_: bool = True,
) -> int:
    """Prepare and run ``command`` (replacing this process unless ``exec_`` is False)."""
    url = default_url(url)
    token = default_token(token)
    root = root or Path.home() / ".cache" / "weightcache" / "launch"
    started = time.monotonic()
    with Client(url, token=token) as client:
        client.wait_until_warm(pipeline)
        warm_s = time.monotonic() - started
        model_dir = stage_model_dir(client, pipeline, tp_size=tp_size, root=root)
    argv = launch_command(
        command, pipeline=pipeline, model_dir=model_dir, tp_size=tp_size, url=url
    )
    print(
        f"weightcache: {pipeline} warm after {warm_s:.1f} s; config in {model_dir}\n"
        f"weightcache: exec {' '.join(argv)}",
        file=sys.stderr,
        flush=True,
    )
    env = dict(os.environ, WEIGHTCACHE_URL=url)
    if token:
        env["WEIGHTCACHE_TOKEN"] = token
    if not exec_:
        import subprocess

        return subprocess.run(argv, env=env, check=False).returncode
    os.execvpe(argv[0], argv, env)
    raise AssertionError("unreachable")
