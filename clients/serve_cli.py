"""``weightcache serve`` and ``weightcache demo``: the commands that run a cache node here.

Server code (FastAPI, uvicorn, the node) is imported only inside them, so the rest of the CLI
runs on a replica with just torch, numpy, httpx and pydantic installed.
"""

from __future__ import annotations

import argparse
import socket
import sys
from typing import Any

from clients.errors import ClientError, UsageError

__all__ = ["cmd_demo", "cmd_serve"]


def cmd_serve(args: argparse.Namespace) -> int:
    """Run a cache node (API and data plane) until interrupted."""
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
    if settings.redis_url is not None:
        _region_settings(settings, args)
    refusal = _serve_refusal(settings, allow_unauthenticated=args.allow_unauthenticated)
    if refusal is not None:
        raise UsageError(refusal)
    data_port = args.data_port if args.data_port is not None else settings.port + 1
    data_plane = None
    if args.data_workers > 0:
        from api.data_plane_supervisor import DataPlane

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


def _region_settings(settings: Any, args: argparse.Namespace) -> None:
    """With ``--redis``: the advertised URL, and the region secret (from the environment or
    ``--region-secret-file``), refused unless it is long enough to guard the region."""
    from pydantic import SecretStr

    from api.schema import is_node_url
    from cache_node.region.peer_auth import MIN_SECRET_LENGTH

    if args.advertise_url is not None:
        settings.regional.advertise_url = args.advertise_url
    for flag, url in (("--advertise", settings.regional.advertise_url),
                      ("WEIGHTCACHE_DATA_URL", settings.data_url)):
        if url is not None and not is_node_url(url):
            # peers and replicas are sent there: a URL they cannot use breaks the region's loads
            raise UsageError(f"{flag}: {url!r} is not an http(s)://host[:port][/prefix] URL")
    if args.region_secret_file is not None:
        try:
            with open(args.region_secret_file, encoding="utf-8") as handle:
                settings.regional.secret = SecretStr(handle.read().strip())
        except OSError as exc:
            raise UsageError(f"--region-secret-file: {exc.strerror}: {exc.filename}") from None
    secret = settings.regional.secret
    if secret is None or len(secret.get_secret_value()) < MIN_SECRET_LENGTH:
        raise UsageError(
            f"--redis needs a region secret of at least {MIN_SECRET_LENGTH} characters, the "
            "same on every node: set WEIGHTCACHE_REGION_SECRET or pass --region-secret-file"
        )


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


def cmd_demo(args: argparse.Namespace) -> int:
    """The main job end to end on this machine (an embedded node, an S3 origin, a load)."""
    from clients.demo import run_demo

    code: int = run_demo(keep=args.keep)
    return code
