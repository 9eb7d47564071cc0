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
from collections.abc import Sequence
from typing import Any

import httpx

from api.schema import ModelSpec, PipelineStatus
from clients.client import Client, WarmFailed, default_url
from clients.errors import ApiError
from clients.render import print_status_table, wait_with_progress, watch_status
from loader.errors import LoaderError, NotWarmError


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, token=args.token)


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

    from api import create_app
    from cache_node.events import configure_logging
    from cache_node.settings import NodeSettings

    configure_logging(args.log_format)

    overrides: dict[str, Any] = {}
    for name in ("host", "port", "data_dir", "capacity", "region", "tokens_file", "redis_url"):
        value = getattr(args, name)
        if value is not None:
            overrides[name] = value
    if args.local_root:
        overrides["local_roots"] = args.local_root
    settings = NodeSettings(**overrides)
    data_port = args.data_port if args.data_port is not None else settings.port + 1
    data_plane: list[Any] = []
    if args.data_workers > 0:
        from cache_node.data_plane import run_data_plane

        if settings.data_url is None:  # WEIGHTCACHE_DATA_URL names it when the bind is a wildcard
            host = socket.getfqdn() if settings.host in ("0.0.0.0", "::", "") else settings.host
            settings.data_url = f"http://{host}:{data_port}"
        data_plane = run_data_plane(settings, port=data_port, workers=args.data_workers)
        print(f"data plane: {args.data_workers} workers on {settings.data_url}", file=sys.stderr)
    print(f"weightcache node {settings.node_id} serving on http://{settings.host}:{settings.port}"
          f" (data dir {settings.data_dir})", file=sys.stderr)
    try:
        uvicorn.run(
            create_app(settings), host=settings.host, port=settings.port, log_level="warning"
        )
    finally:
        if data_plane:
            from cache_node.data_plane import stop_data_plane

            stop_data_plane(data_plane)
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    with _client(args) as client:
        status = client.register(
            args.id, models=args.model, tp_sizes=args.tp or [1], pinned=args.pin
        )
        if not args.wait:
            print(f"{status.id}: {status.state}")
            return 0 if status.state != "failed" else 1
        try:
            final = wait_with_progress(client, args.id)
        except WarmFailed as exc:
            print(f"{args.id}: failed: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
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
    from loader.launcher import LaunchError, launch

    try:
        code: int = launch(
            args.id,
            tp_size=args.tp_size,
            command=args.command,
            url=args.url,
            token=args.token,
            model=args.model,
            exec_=args.exec_,
        )
    except LaunchError as exc:
        print(f"error: launch: {exc}", file=sys.stderr)
        return 2
    return code


def cmd_demo(args: argparse.Namespace) -> int:
    from clients.demo import run_demo

    code: int = run_demo(keep=args.keep)
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weightcache", description="Regional weight cache for serverless GPU inference."
    )
    parser.add_argument("--url", default=None, help="node URL (default $WEIGHTCACHE_URL or "
                        "http://127.0.0.1:8470)")
    parser.add_argument("--token", default=None, help="bearer token (default $WEIGHTCACHE_TOKEN)")
    sub = parser.add_subparsers(dest="command_name", required=True)

    serve = sub.add_parser("serve", help="run a cache node")
    serve.add_argument("--data-dir", default=None)
    serve.add_argument("--host", default=None, help="default 127.0.0.1 ($WEIGHTCACHE_HOST)")
    serve.add_argument("--port", type=int, default=None, help="default 8470 ($WEIGHTCACHE_PORT)")
    serve.add_argument("--capacity", default=None, help="e.g. 100GiB")
    serve.add_argument("--region", default=None)
    serve.add_argument("--tokens", dest="tokens_file", default=None,
                       help="JSON file mapping token to tenant; enables auth")
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

    register = sub.add_parser("register", help="register a pipeline and start its pre-warm")
    register.add_argument("id")
    register.add_argument("--model", type=_parse_model, action="append", required=True,
                          help="NAME=SOURCE (hf://ORG/REPO[@REV], s3://BUCKET/PREFIX, "
                          "file:///PATH); repeatable")
    register.add_argument("--tp", type=_parse_tp, default=None, help="TP sizes, e.g. 1,2")
    register.add_argument("--pin", action="store_true", help="never evict this pipeline")
    register.add_argument("--wait", action="store_true", help="show progress until warm")
    register.set_defaults(func=cmd_register)

    status = sub.add_parser("status", help="show pipelines")
    status.add_argument("id", nargs="?")
    status.add_argument("--json", action="store_true")
    status.add_argument("--watch", action="store_true", help="live table")
    status.set_defaults(func=cmd_status)

    load = sub.add_parser("load", help="a replica cold start: stream a rank's weights")
    load.add_argument("id")
    load.add_argument("--tp-size", type=int, default=1)
    load.add_argument("--rank", type=int, default=0)
    load.add_argument("--device", default="cpu", help="cuda:0 or cpu")
    load.add_argument("--local-dir", default=None, help="the node's data dir, if on this host")
    load.add_argument("--verify", action="store_true", help="check every byte's digest")
    load.add_argument("--json", action="store_true")
    load.set_defaults(func=cmd_load)

    pull = sub.add_parser("pull", help="materialise a pipeline's files in a directory")
    pull.add_argument("id")
    pull.add_argument("--dest", required=True)
    pull.set_defaults(func=cmd_pull)

    launch = sub.add_parser(
        "launch",
        help="start vLLM on a pipeline: launch ID -- vllm serve",
        description=LAUNCH_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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

    for name, func, text in (
        ("evict", cmd_evict, "free a pipeline's bytes"),
        ("delete", cmd_delete, "forget a pipeline"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("id")
        p.set_defaults(func=func)

    demo = sub.add_parser("demo", help="the main job end to end on this machine")
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
    """Entry point of the ``weightcache`` console script."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        code: int = args.func(args)
    except ApiError as exc:
        print(f"error: {exc.code or exc.status}: {exc.message}", file=sys.stderr)
        return 2
    except LoaderError as exc:
        reason = "not_warm" if isinstance(exc, NotWarmError) else getattr(exc, "code", None)
        print(f"error: {reason or type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except httpx.TransportError as exc:
        print(f"error: cannot reach the node at {default_url(args.url)}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
