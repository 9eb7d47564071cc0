"""``weightcache load``: a replica cold start from the command line, with its stage table."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path
from typing import Any

import httpx

from clients.client import auth_headers, default_token, default_url
from clients.errors import UsageError


def report_to_node(
    url: str, token: str | None, pipeline: str, report: dict[str, Any], *, local: bool
) -> None:
    """Send a load's stage timings to the node's cold-start history (best effort)."""
    body = {
        "tp_size": report["tp_size"],
        "rank": report["rank"],
        "device": report["device"],
        "bytes": report["bytes_delivered"],
        "gbps": report["gb_per_s"],
        "source": "local" if local else "http",
        "stages": {
            "lease": report["lease_s"],
            "manifest": report["manifest_s"],
            "connect": report["connect_s"],
            "stream": report["stream_s"],
            "verify": report["verify_s"],
            "total": report["total_s"],
        },
    }
    if report.get("capture") is not None:  # whether a capture was replayed, and if not, why
        body["capture"] = report["capture"]
    # The history is a convenience: a load that worked is not failed by it.
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{url}/v1/pipelines/{pipeline}/loads", json=body, headers=auth_headers(token),
                   timeout=5)


def print_stage_table(report: dict[str, Any]) -> None:
    rows = [
        ("lease", report["lease_s"]),
        ("manifest", report["manifest_s"]),
        ("connect", report["connect_s"]),
        ("stream", report["stream_s"]),
        ("verify", report["verify_s"]),
        ("total", report["total_s"]),
    ]
    where = f"tp {report['tp_size']} rank {report['rank']} → {report['device']}"
    print(f"{report['pipeline']}  {where}")
    for stage, seconds in rows:
        print(f"  {stage:<9} {seconds * 1000:9.1f} ms")
    gigabytes = report["bytes_delivered"] / 1e9
    print(f"  {gigabytes:.3f} GB at {report['gb_per_s']:.2f} GB/s")
    served: dict[str, int] = report.get("bytes_by_node") or {}
    failed: dict[str, str] = report.get("failed_nodes") or {}
    if len(served) > 1 or failed:
        for node, count in served.items():
            print(f"  from {node}  {count / 1e9:.3f} GB")
    for node, reason in failed.items():
        print(f"  failed: {node} ({reason})")
    if report.get("failovers"):
        print(f"  note: {report['failovers']} reads were re-read from another node")
    if report.get("fallback_reads"):
        print(f"  note: {report['fallback_reads']} reads came from the node's API instead of "
              f"its data plane ({report['fallback_reason']})")


def parse_device(text: str) -> Any:
    """``--device`` as a torch device this machine has; :class:`UsageError` otherwise."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise UsageError(
            f"--device {text!r} is not a device torch knows; use cpu, cuda or cuda:N"
        ) from None
    if device.type == "cpu":
        return device
    backend = getattr(torch, device.type, None)
    is_available = getattr(backend, "is_available", None)
    if not callable(is_available) or not is_available():
        raise UsageError(f"--device {text}: this machine has no {device.type} device "
                         f"(torch {torch.__version__})")
    count = getattr(backend, "device_count", lambda: 1)()
    if device.index is not None and device.index >= count:
        raise UsageError(f"--device {text}: this machine has {count} {device.type} device(s)")
    return device


def run_load(args: argparse.Namespace) -> int:
    from loader.loading import load

    device = parse_device(args.device)
    url = default_url(args.url).rstrip("/")
    token = default_token(args.token)
    local_dir = Path(args.local_dir) if args.local_dir else None
    result = load(
        args.id,
        tp_size=args.tp_size,
        rank=args.rank,
        device=device,
        url=url,
        token=token,
        local_dir=local_dir,
        verify=args.verify,
    )
    report = result.report.as_dict()
    report["tensors"] = len(result.tensors)
    report_to_node(url, token, args.id, report, local=local_dir is not None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_stage_table(report)
    return 0
