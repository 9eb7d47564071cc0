"""The commands that manage pipelines on a node: register, status, warm, evict, delete, pull."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from api.schema import PipelineStatus
from clients.client import Client
from clients.errors import EXIT_FAILURE, ApiError, WarmFailed
from clients.render import print_region, print_status_table, wait_with_progress, watch_status

__all__ = ["cmd_delete", "cmd_evict", "cmd_pull", "cmd_register", "cmd_status", "cmd_warm"]


def _client(args: argparse.Namespace) -> Client:
    return Client(args.url, token=args.token, tenant=args.tenant)


def cmd_register(args: argparse.Namespace) -> int:
    """Register (upsert) a pipeline; with ``--wait``, until its spec is warm or failed."""
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
    """A table (or JSON) of one pipeline or all of them; ``--watch`` keeps it live."""
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
            if not args.id:
                _print_region(client)
    return 0


def _print_region(client: Client) -> None:
    """The region's nodes under the table, on a node of a region (``--redis``); nothing on a
    node on its own, or one that predates ``GET /v1/region``."""
    try:
        region = client.region()
    except ApiError:
        return
    if region.connected is not False:
        print_region(region)


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
    """Free a pipeline's bytes (it stays registered)."""
    with _client(args) as client:
        status = client.evict(args.id)
    print(f"{status.id}: {status.state}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    """Forget a pipeline."""
    with _client(args) as client:
        client.delete(args.id)
    print(f"{args.id}: deleted")
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    """A pipeline's files, verified, in a directory or in the Hugging Face cache."""
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
