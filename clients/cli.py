"""The ``weightcache`` command line (see ``weightcache --help``).

Server code is imported only inside ``serve`` and ``demo``, so the replica side (``load``, ``pull``,
``launch``) runs with just torch, numpy, httpx and pydantic installed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import httpx

from api.schema import ModelSpec, PipelineStatus
from clients.client import Client, WarmFailed, default_url
from clients.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_USAGE,
    ApiError,
    ClientError,
    UnreachableError,
    UsageError,
)
from clients.render import print_status_table, wait_with_progress, watch_status

_EXIT_CODES = f"""\
exit codes:
  0    done
  {EXIT_FAILURE}    failed: a warm or load failed, bytes did not verify, the node is unreachable
  {EXIT_USAGE}    usage error: a bad argument or value
  {EXIT_REFUSED}    refused by the node: unauthorised, not found, not warm, conflict, no room
  {EXIT_INTERRUPTED}  interrupted
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("weightcache")
    except PackageNotFoundError:  # running from a source tree that was never installed
        return "unknown"


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, token=args.token, tenant=args.tenant)


def _parse_model(text: str) -> ModelSpec:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"--model wants NAME=SOURCE, got {text!r}")
    return ModelSpec(name=name, source=source)


def _parse_tp(text: str) -> list[int]:
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tp wants sizes like 1,2,4, got {text!r}") from None
    if not sizes:
        raise argparse.ArgumentTypeError("--tp needs at least one size")
    return sizes


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn
    from pydantic import ValidationError

    from api import create_app
    from cache_node.events import configure_logging
    from cache_node.settings import NodeSettings

    configure_logging(args.log_format)

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir", "capacity", "region", "tokens_file", "redis_url",
                 "disk_headroom"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.local_root:
        overrides["local_roots"] = args.local_root
    try:
        settings = NodeSettings(**overrides)
    except ValidationError as exc:
        raise UsageError(_settings_problem(exc)) from None
    refusal = _serve_refusal(settings, allow_unauthenticated=args.allow_unauthenticated)
    if refusal is not None:
        raise UsageError(refusal)
    data_port = args.data_port if args.data_port is not None else settings.port + 1
    data_plane = None
    if args.data_workers > 0:
        from cache_node.data_plane_supervisor import DataPlane

        if settings.data_url is None:  # WEIGHTCACHE_DATA_URL names it when the bind is a wildcard
            host = socket.getfqdn() if settings.host in ("0.0.0.0", "::", "") else settings.host
            settings.data_url = f"http://{host}:{data_port}"
        # Supervised: a worker that dies is started again (and /readyz says when none runs).
        try:
            data_plane = DataPlane(
                settings, port=data_port, workers=args.data_workers, log_format=args.log_format
            ).start()
        except RuntimeError as exc:  # the port is taken, or no worker could start
            raise ClientError(f"{exc} (choose another with --data-port)") from None
        print(f"data plane: {args.data_workers} workers on {settings.data_url}", file=sys.stderr)
    print(f"weightcache node {settings.node_id} serving on http://{settings.host}:{settings.port}"
          f" (data dir {settings.data_dir})", file=sys.stderr)
    app = create_app(settings, data_plane=data_plane)
    _reload_tokens_on_sighup(app.state.tokens_watcher, data_plane)
    try:
        uvicorn.run(
            app,
            host=settings.host,
            port=settings.port,
            log_level="warning",
        )
    finally:
        if data_plane is not None:
            data_plane.stop()
    return 0


def _reload_tokens_on_sighup(watcher: Any, data_plane: Any) -> None:
    """SIGHUP: every process of the node re-reads the tokens file now (the API's watcher, and
    each data-plane worker by a forwarded SIGHUP). Without a tokens file it does nothing,
    rather than end the node as SIGHUP otherwise would."""
    import signal

    def reload(signum: int, frame: Any) -> None:
        if watcher is not None:
            watcher.poke()
        if data_plane is not None:
            data_plane.reload_tokens()

    signal.signal(signal.SIGHUP, reload)


def _settings_problem(exc: Any) -> str:
    """The first problem of a settings ValidationError, as the flag a user would recognise."""
    first = exc.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ()))
    flag = {"tokens_file": "tokens", "redis_url": "redis", "local_roots": "local-root"}.get(
        where, where
    ).replace("_", "-")
    message = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    return f"--{flag}: {message}" if flag else message


def _serve_refusal(settings: Any, *, allow_unauthenticated: bool) -> str | None:
    """Why this node must not start (a bad tokens file; no auth on an open address), or None."""
    import logging

    from cache_node.access import TenantAccess, is_loopback_host
    from cache_node.events import emit

    if settings.tokens_file is not None:
        try:
            TenantAccess(settings)
        except ValueError as exc:
            emit("serve.refused", level=logging.ERROR, reason="bad_tokens_file")
            return str(exc)
        return None
    if allow_unauthenticated or is_loopback_host(settings.host):
        return None
    emit("serve.refused", level=logging.ERROR, reason="no_auth_on_open_address",
         host=settings.host)
    return (
        f"refusing to serve on {settings.host!r} without auth: anyone who can reach it could "
        "read and register weights. Pass --tokens FILE, bind a loopback address "
        "(--host 127.0.0.1), or pass --allow-unauthenticated if the network in front of it "
        "is trusted."
    )


def cmd_register(args: argparse.Namespace) -> int:
    models = [
        model.model_copy(update={
            "revision": model.revision or args.revision,
            "include": args.include or None,
            "exclude": args.exclude or None,
        })
        for model in args.model
    ]
    with _client(args) as client:
        status = client.register(
            args.id, models=models, tp_sizes=args.tp or [1], pinned=args.pin
        )
        if not args.wait:
            print(f"{status.id}: {status.state}")
            return 0 if status.state != "failed" else 1
        return _wait_for_new_spec(client, args.id)


def _wait_for_new_spec(client: Client, pipeline_id: str) -> int:
    """Wait until the registered spec is warm: 0, or 1 with the reason when it failed.

    A re-registration of a warm pipeline fills beside it (``pending``) while ``state`` stays
    ``warm``; it has its outcome when ``pending`` is gone: swapped in, or ``last_attempt``.
    """
    try:
        final = wait_with_progress(client, pipeline_id)
        while final.pending is not None:
            time.sleep(0.2)
            final = client.status(pipeline_id)
    except WarmFailed as exc:
        print(f"{pipeline_id}: failed: {exc.code}: {exc.message}", file=sys.stderr)
        return EXIT_FAILURE
    if final.last_attempt is not None:
        error = final.last_attempt.error
        reason = f"{error.code}: {error.message}" if error else final.last_attempt.state
        print(f"{pipeline_id}: the new spec failed ({reason}); the previous one stays warm",
              file=sys.stderr)
        return EXIT_FAILURE
    print(f"{final.id}: warm ({final.bytes_total:,} bytes)")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.watch:
            watch_status(client, args.id)
            return 0
        statuses: list[PipelineStatus] = (
            [client.status(args.id)] if args.id else client.pipelines()
        )
        if args.json:
            payload: Any = (
                statuses[0].model_dump(mode="json")
                if args.id
                else {"pipelines": [s.model_dump(mode="json") for s in statuses]}
            )
            print(json.dumps(payload, indent=2))
        else:
            print_status_table(statuses)
    return 0


def cmd_warm(args: argparse.Namespace) -> int:
    """Re-warm now: after an eviction, or a failure (whatever its ``retry_at`` says)."""
    with _client(args) as client:
        status = client.warm(args.id)
        if args.wait:
            return _wait_for_new_spec(client, args.id)
    note = " (re-registration filling)" if status.pending else ""
    print(f"{status.id}: {status.state}{note}")
    return 0


def cmd_evict(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.evict(args.id)
    print(f"{status.id}: {status.state}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.id)
    print(f"{args.id}: deleted")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    if args.hf_cache is not None:
        from pathlib import Path

        from clients.hf_cache import default_hf_cache, print_progress, pull_to_hf_cache

        cache_dir = Path(args.hf_cache) if args.hf_cache else default_hf_cache()
        with _client(args) as client:
            pulled = pull_to_hf_cache(client, args.id, cache_dir=cache_dir,
                                      progress=print_progress)
        fetched = sum(1 for f in pulled if not f.skipped)
        repos = sorted({f.repo_id for f in pulled})
        print(f"{args.id}: {len(pulled)} files ({fetched} fetched, {len(pulled) - fetched} "
              f"already present) in {cache_dir} as {', '.join(repos)}")
        return 0
    from clients.pull import pull

    with _client(args) as client:
        written = pull(client, args.id, dest=args.dest)
    print(f"{args.id}: {len(written)} files in {args.dest}")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from clients.load_cli import run_load

    code: int = run_load(args)
    return code


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

It prints the cold start: waiting for warm, staging files, each rank's weights (bytes,
seconds, GB/s, printed by the plugin inside vLLM), and engine ready (when /health answers).

examples:
  weightcache launch chat-8b --tp-size 2 -- vllm serve --port 8000
  weightcache launch asr-llm --model llm -- vllm serve     # one model of a pipeline of two
"""



def cmd_launch(args: argparse.Namespace) -> int:
    from loader.launcher import launch

    code: int = launch(
        args.id,
        tp_size=args.tp_size,
        command=args.command,
        url=args.url,
        token=args.token,
        model=args.model,
        exec_=args.exec_,
    )
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from clients.demo import run_demo

    code: int = run_demo(keep=args.keep)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcache",
        description="Regional weight cache for serverless GPU inference.",
        epilog=_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"weightcache {_version()}")
    parser.add_argument("--url", default=None, help="node URL (default $WEIGHTCACHE_URL or "
                        "http://127.0.0.1:8470)")
    parser.add_argument("--token", default=None, help="bearer token (default $WEIGHTCACHE_TOKEN)")
    parser.add_argument("--tenant", default=None,
                        help="with an admin token: act on this tenant's pipelines (an id "
                        "several tenants use is otherwise a 409 ambiguous_pipeline)")
    # --url, --token and --tenant work after the subcommand too; SUPPRESS keeps the value given
    # before it when they are not repeated there.
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument("--url", default=argparse.SUPPRESS, help="node URL")
    connection.add_argument("--token", default=argparse.SUPPRESS, help="bearer token")
    connection.add_argument("--tenant", default=argparse.SUPPRESS,
                            help="with an admin token: this tenant's pipelines")
    subparsers = parser.add_subparsers(dest="command_name", required=True)

    def command(name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs.setdefault("epilog", _EXIT_CODES)
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        made: argparse.ArgumentParser = subparsers.add_parser(
            name, parents=[connection], **kwargs
        )
        return made

    serve = command("serve", help="run a cache node")
    serve.add_argument("--data-dir", default=None)
    serve.add_argument("--host", default=None, help="default 127.0.0.1 ($WEIGHTCACHE_HOST)")
    serve.add_argument("--port", type=int, default=None, help="default 8470 ($WEIGHTCACHE_PORT)")
    serve.add_argument("--capacity", default=None, help="e.g. 100GiB")
    serve.add_argument("--disk-headroom", default=None,
                       help="space kept free on the data dir's filesystem for metadata when "
                            "the disk fills (default 16MiB)")
    serve.add_argument("--region", default=None)
    serve.add_argument("--tokens", dest="tokens_file", default=None,
                       help="JSON file mapping token to tenant (and tenant policies); "
                       "enables auth")
    serve.add_argument("--allow-unauthenticated", action="store_true",
                       help="serve without --tokens on a non-loopback address (refused "
                       "otherwise); only behind a network you trust")
    serve.add_argument("--local-root", action="append", default=[],
                       help="directory file:// sources may come from (repeatable)")
    serve.add_argument("--redis", dest="redis_url", default=None)
    serve.add_argument("--data-port", type=int, default=None,
                       help="port of the sendfile data plane (default: --port + 1)")
    serve.add_argument("--data-workers", type=int, default=min(8, os.cpu_count() or 1),
                       help="data plane processes (0: none, blobs only through the API)")
    serve.add_argument("--log-format", choices=("text", "json"), default="text",
                       help="structured event lines on stderr: text, or one JSON object a line")
    serve.set_defaults(func=cmd_serve)

    register = command("register", help="register a pipeline and start its pre-warm")
    register.add_argument("id")
    register.add_argument("--model", type=_parse_model, action="append", required=True,
                          help="NAME=SOURCE (hf://ORG/REPO[@REV], s3://BUCKET/PREFIX, "
                          "file:///PATH); repeatable")
    register.add_argument("--tp", type=_parse_tp, default=None, help="TP sizes, e.g. 1,2")
    register.add_argument("--revision", default=None,
                          help="branch, tag or commit (for every model without hf://...@REV)")
    register.add_argument("--include", action="append", default=[], metavar="PATTERN",
                          help="only files matching a pattern, as hf download (repeatable)")
    register.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                          help="skip files matching a pattern, after --include (repeatable)")
    register.add_argument("--pin", action="store_true", help="never evict this pipeline")
    register.add_argument("--wait", action="store_true", help="show progress until warm")
    register.set_defaults(func=cmd_register)

    status = command("status", help="show pipelines")
    status.add_argument("id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="live table")
    status.set_defaults(func=cmd_status)

    load = command("load", help="a replica cold start: stream a rank's weights")
    load.add_argument("id")
    load.add_argument("--tp-size", type=int, default=1)
    load.add_argument("--rank", type=int, default=0)
    load.add_argument("--device", default="cpu", help="cuda:0 or cpu")
    load.add_argument("--local-dir", default=None, help="the node's data dir, if on this host")
    load.add_argument("--verify", action="store_true", help="check every byte's digest")
    load.add_argument("--json", action="store_true")
    load.set_defaults(func=cmd_load)

    pull = command("pull", help="materialise a pipeline's files in a directory")
    pull.add_argument("id")
    where = pull.add_mutually_exclusive_group(required=True)
    where.add_argument("--dest", help="a directory: the files as the model has them")
    where.add_argument("--hf-cache", nargs="?", const="", default=None, metavar="DIR",
                       help="the Hugging Face cache layout, so from_pretrained(ORG/NAME) works "
                       "offline (default: $HF_HUB_CACHE, else $HF_HOME/hub)")
    pull.set_defaults(func=cmd_pull)

    launch = command(
        "launch",
        help="start vLLM on a pipeline: launch ID -- vllm serve",
        description=LAUNCH_HELP,
        usage="weightcache launch ID [--tp-size N] [--model NAME] [--exec] -- COMMAND ...",
    )
    launch.add_argument("id", help="the pipeline")
    launch.add_argument(
        "--tp-size", type=int, default=1, help="vLLM's --tensor-parallel-size (default 1)"
    )
    launch.add_argument(
        "--model",
        default=None,
        help="which model of a multi-model pipeline this engine serves (passed as \"model\" "
        "in --model-loader-extra-config)",
    )
    launch.add_argument(
        "--exec",
        dest="exec_",
        action="store_true",
        help="replace this process with the engine (no 'engine ready' line)",
    )
    launch.add_argument("command", nargs="*", help="the engine command, after --")
    launch.set_defaults(func=cmd_launch)

    warm = command("warm", help="re-warm a pipeline now (after eviction or failure)")
    warm.add_argument("id")
    warm.add_argument("--wait", action="store_true", help="show progress until warm")
    warm.set_defaults(func=cmd_warm)

    for name, func, text in (
        ("evict", cmd_evict, "free a pipeline's bytes"),
        ("delete", cmd_delete, "forget a pipeline"),
    ):
        p = command(name, help=text)
        p.add_argument("id")
        p.set_defaults(func=func)

    demo = command("demo", help="the main job end to end on this machine")
    demo.add_argument("--keep", action="store_true", help="keep the demo's data dir")
    demo.set_defaults(func=cmd_demo)
    return parser


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Parse a command line; everything after the first ``--`` is ``launch``'s engine command.

    argparse alone would read the engine's flags (or the launcher's own, after the id) wrongly.
    """
    parser = build_parser()
    words, tail = list(argv), []
    if "--" in words:
        at = words.index("--")
        words, tail = words[:at], words[at + 1 :]
    args = parser.parse_args(words)
    if args.command_name == "launch":
        args.command = list(args.command) + tail
        if not args.command:
            parser.error(
                "launch needs the engine command after --, e.g. "
                "weightcache launch ID -- vllm serve"
            )
    elif tail:
        parser.error(f"unexpected arguments after --: {' '.join(tail)}")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``weightcache`` console script.

    Every error a user can cause or meet ends here, as one line on stderr and an exit code from
    :mod:`clients.errors`; a traceback is printed only for a bug.
    """
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code: int = args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except httpx.TransportError as exc:
        error: ClientError = UnreachableError(
            f"cannot reach the node at {default_url(args.url)}: {exc or type(exc).__name__}"
        )
    except ClientError as exc:
        error = exc
    except OSError as exc:  # a local file or directory the command was pointed at
        error = ClientError(str(exc))
    else:
        return code
    message = error.message if isinstance(error, ApiError) else str(error)
    print(f"error: {error.code}: {message}", file=sys.stderr)
    return error.exit_code


if __name__ == "__main__":
    sys.exit(main())
