"""``weightcache launch ID [--model NAME] -- vllm serve [ARGS]``: the thin vLLM launcher.

It waits until the pipeline is warm (re-warming it if it was evicted), puts the pipeline's small
files (config, tokenizer) in a local directory for vLLM's front end, and runs the command with
``--load-format weightcache`` and the loader's options, so every worker streams its own rank's
weights from the cache straight into its parameters. Weights never touch the local disk.

It prints the cold start as it goes: the wait for warm, the staging of the small files, then,
from inside vLLM, one line per rank with its weights (bytes, seconds, GB/s), and, when it
supervises the engine (the default), the moment the engine answers ``/health``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

import httpx

from clients.client import Client, default_token, default_url
from clients.pull import fetch_file
from loader.compile_cache import CompileCache
from loader.errors import LaunchError


def launch_command(
    command: Sequence[str],
    *,
    pipeline: str,
    model_dir: Path,
    tp_size: int,
    url: str,
    model: str | None = None,
    ready_file: Path | None = None,
) -> list[str]:
    """The command vLLM runs: ``command`` with the model dir and loader flags added.

    ``vllm serve`` gets ``model_dir`` as its model unless one is given; flags the user already
    passed are kept as they are.
    """
    if not command:
        raise LaunchError("launch needs the engine command after --, e.g. -- vllm serve")
    argv = list(command)
    if "serve" in argv:
        at = argv.index("serve") + 1
        if at == len(argv) or argv[at].startswith("-"):
            argv.insert(at, str(model_dir))
    options: dict[str, object] = {"pipeline": pipeline, "url": url}
    if model is not None:
        options["model"] = model
    if ready_file is not None:  # engine shard sets upload once the engine answers
        options["ready_file"] = str(ready_file)
    flags = {
        "--load-format": "weightcache",
        "--model-loader-extra-config": json.dumps(options),
        "--tensor-parallel-size": str(tp_size),
    }
    for flag, value in flags.items():
        if not any(a == flag or a.startswith(f"{flag}=") for a in argv):
            argv += [flag, value]
    return argv


def stage_model_dir(
    client: Client, pipeline: str, *, tp_size: int, root: Path, model: str | None = None
) -> tuple[Path, int]:
    """Write one model's non-weight files (config, tokenizer) under ``root``, each verified.

    Returns the directory and the bytes written. A pipeline of several models needs ``model``
    (their ``config.json`` files would otherwise overwrite each other).
    """
    manifest = client.manifest(pipeline, tp_size=tp_size, rank=0)
    models = sorted({f.model for f in manifest.files} | {t.model for t in manifest.tensors})
    if model is None and len(models) > 1:
        raise LaunchError(
            f"pipeline {pipeline!r} has models {models}: pick one with --model NAME"
        )
    if model is not None and model not in models:
        raise LaunchError(f"pipeline {pipeline!r} has no model {model!r} (has {models})")
    target = root / pipeline / model if model is not None else root / pipeline
    written = 0
    for file in manifest.files:
        if model is not None and file.model != model:
            continue
        fetch_file(client, target, file.path, blob=file.blob, size=file.size)
        written += file.size
    return target, written


def _say(message: str) -> None:
    print(f"weightcache: {message}", file=sys.stderr, flush=True)


def health_url(argv: Sequence[str]) -> str | None:
    """Where a ``vllm serve`` command will answer ``/health`` (None for other commands)."""
    if "serve" not in argv:
        return None

    def flag(name: str, default: str) -> str:
        for index, word in enumerate(argv):
            if word == name and index + 1 < len(argv):
                return argv[index + 1]
            if word.startswith(f"{name}="):
                return word.split("=", 1)[1]
        return default

    host = flag("--host", "127.0.0.1")
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"
    return f"http://{host}:{flag('--port', '8000')}/health"


def launch(
    pipeline: str,
    *,
    tp_size: int,
    command: Sequence[str],
    url: str | None = None,
    token: str | None = None,
    root: Path | None = None,
    model: str | None = None,
    exec_: bool = False,
    compile_cache_limit: int = 1 << 30,
) -> int:
    """Prepare and run ``command``; returns its exit code.

    By default the engine runs as a child: signals are passed on to it and the launcher prints
    when it is ready; then the engine's workers upload their engine shard sets (when their
    load needed one) and the launcher the engine's compile cache (at most
    ``compile_cache_limit`` bytes; 0: no compile cache). ``exec_`` replaces this process with
    the engine instead (no ready line, and nothing uploaded: no one is left to say when).
    """
    if not command:
        raise LaunchError("launch needs the engine command after --, e.g. -- vllm serve")
    url = default_url(url)
    token = default_token(token)
    root = root or Path.home() / ".cache" / "weightcache" / "launch"
    started = time.monotonic()
    with Client(url, token=token) as client:
        _say(f"waiting for {pipeline} to be warm")
        client.wait_until_warm(pipeline)
        warm_s = time.monotonic() - started
        _say(f"{pipeline} warm after {warm_s:.1f} s")
        mark = time.monotonic()
        model_dir, staged = stage_model_dir(
            client, pipeline, tp_size=tp_size, root=root, model=model
        )
        _say(
            f"staged {staged / 1e6:.1f} MB of config and tokenizer files in "
            f"{time.monotonic() - mark:.2f} s into {model_dir}"
        )
        manifest = client.manifest(pipeline, tp_size=tp_size, rank=0)
    ready_file = None if exec_ else model_dir.parent / f".{model_dir.name}.ready-{os.getpid()}"
    argv = launch_command(
        command, pipeline=pipeline, model_dir=model_dir, tp_size=tp_size, url=url, model=model,
        ready_file=ready_file,
    )
    env = dict(os.environ, WEIGHTCACHE_URL=url)
    if token:
        env["WEIGHTCACHE_TOKEN"] = token
    compile_cache = CompileCache.prepare(
        argv, manifest=manifest, model=model, tp_size=tp_size, model_dir=model_dir, url=url,
        token=token, pipeline=pipeline, env=env, limit=compile_cache_limit, say=_say,
    )
    _say(f"{'exec' if exec_ else 'run'} {' '.join(argv)}")
    if exec_:
        os.execvpe(argv[0], argv, env)

    def ready() -> None:
        assert ready_file is not None
        ready_file.touch()
        if compile_cache is not None:
            compile_cache.after_ready()

    try:
        return _supervise(argv, env, started=started, on_ready=ready)
    finally:
        if ready_file is not None:
            ready_file.unlink(missing_ok=True)


def _supervise(
    argv: list[str], env: dict[str, str], *, started: float,
    on_ready: Callable[[], None] | None = None,
) -> int:
    """Run the engine as a child, pass signals on, and say when it answers ``/health``
    (then call ``on_ready``, in the watcher's thread)."""
    child = subprocess.Popen(argv, env=env)
    done = threading.Event()

    def forward(signum: int, frame: FrameType | None) -> None:
        child.send_signal(signum)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, forward)
    watcher = None
    target = health_url(argv)
    if target is not None:
        watcher = threading.Thread(
            target=_watch_ready, args=(target, child, done, started, on_ready), daemon=True
        )
        watcher.start()
    try:
        code = child.wait()
    finally:
        done.set()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if watcher is not None:
            watcher.join(timeout=5)
    if code != 0:
        _say(f"the engine exited with status {code}")
    return code


def _watch_ready(
    target: str, child: subprocess.Popen[bytes], done: threading.Event, started: float,
    on_ready: Callable[[], None] | None = None,
) -> None:
    with httpx.Client(timeout=2.0) as http:
        while not done.is_set() and child.poll() is None:
            try:
                answered = http.get(target).status_code == 200
            except httpx.HTTPError:
                answered = False
            if answered:
                _say(
                    f"engine ready ({target} answers) {time.monotonic() - started:.1f} s "
                    "after launch"
                )
                if on_ready is not None:
                    on_ready()
                return
            done.wait(0.5)
