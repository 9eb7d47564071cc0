"""The ``weightcache`` command line (see ``weightcache --help``): its arguments, and the one place
its errors end.

Each command group's handlers live in a module of their own: :mod:`clients.serve_cli` (``serve``,
``demo``), :mod:`clients.pipeline_cli` (``register``, ``status``, ``warm``, ``evict``,
``delete``, ``pull``), :mod:`clients.load_cli` (``load``), :mod:`clients.launch_cli`
(``launch``). Server code is imported only inside ``serve`` and ``demo``, so the replica side
(``load``, ``pull``, ``launch``) runs with just torch, numpy, httpx and pydantic installed.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

import httpx

from api.schema import ModelSpec
from clients.client import default_url
from clients.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_REFUSED,
    EXIT_USAGE,
    ApiError,
    ClientError,
    UnreachableError,
)
from clients.launch_cli import LAUNCH_HELP, cmd_launch
from clients.load_cli import run_load
from clients.pipeline_cli import (
    cmd_delete,
    cmd_evict,
    cmd_pull,
    cmd_register,
    cmd_status,
    cmd_warm,
)
from clients.serve_cli import cmd_demo, cmd_serve

__all__ = ["build_parser", "main", "parse_args"]

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


def _usage_error(message: str, *, prog: str) -> NoReturn:
    """End with a usage error: one line, like every other error of the CLI, and exit 2."""
    print(f"error: usage: {message} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(EXIT_USAGE)


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors told in the CLI's one line (subcommands inherit it)."""

    def error(self, message: str) -> NoReturn:
        _usage_error(message, prog=self.prog)


def build_parser() -> argparse.ArgumentParser:
    """The ``weightcache`` parser: each subcommand's ``func`` is its handler."""
    parser = _Parser(
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
    connection = _Parser(add_help=False)
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
    serve.add_argument("--redis", dest="redis_url", default=None,
                       help="join a region on this Redis (redis://HOST:PORT/DB); the region "
                       "secret comes from $WEIGHTCACHE_REGION_SECRET or --region-secret-file")
    serve.add_argument("--advertise", dest="advertise_url", default=None,
                       help="the URL peers and replicas reach this node's API at "
                       "(default: the address it serves on)")
    serve.add_argument("--region-secret-file", default=None,
                       help="a file holding the region secret (at least 32 characters)")
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
    load.set_defaults(func=run_load)

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
        usage="weightcache launch ID [--tp-size N] [--model NAME] [--compile-cache-limit MIB] "
        "[--exec] -- COMMAND ...",
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
    launch.add_argument(
        "--compile-cache-limit",
        type=int,
        default=1024,
        metavar="MIB",
        help="the largest compile cache uploaded to the node, in MiB (default 1024; 0: no "
        "compile cache, neither fetched nor uploaded)",
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
            _usage_error(
                "launch needs the engine command after --, e.g. "
                "weightcache launch ID -- vllm serve",
                prog="weightcache launch",
            )
    elif tail:
        _usage_error(
            f"unexpected arguments after --: {' '.join(tail)}",
            prog=f"weightcache {args.command_name}",
        )
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
