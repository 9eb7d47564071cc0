"""Terminal rendering of pipeline status: chips, progress bars, a live table (rich when present)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from api.schema import PipelineStatus
from clients.client import Client

CHIP_STYLE = {
    "warm": "bold green",
    "warming": "bold yellow",
    "cold": "bold blue",
    "failed": "bold red",
    "evicted": "bold magenta",
}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _ago(timestamp: float | None) -> str:
    if timestamp is None:
        return "never"
    seconds = max(0.0, time.time() - timestamp)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _bar(progress: float, width: int = 12) -> str:
    filled = round(max(0.0, min(1.0, progress)) * width)
    return "█" * filled + "░" * (width - filled)


def _row(status: PipelineStatus) -> list[str]:
    shards = " ".join(
        f"tp{tp}:{'✓' if state == 'ready' else '…'}" for tp, state in status.shards.items()
    )
    detail = ""
    if status.error is not None:
        detail = f"{status.error.code}: {status.error.message}"
        if status.error.retry_at:
            retry = datetime.fromtimestamp(status.error.retry_at).strftime("%H:%M:%S")
            detail += f" (retry {retry}, attempt {status.error.attempts or 1})"
        else:
            detail += " (waits for a person: weightcache warm ID)"
    elif status.evicted_reason:
        detail = f"evicted: {status.evicted_reason}"
    if status.pending is not None:
        detail = f"new spec filling {status.pending.progress * 100:.0f}% {detail}".strip()
    elif status.last_attempt is not None and status.last_attempt.error is not None:
        error = status.last_attempt.error
        detail = f"new spec failed: {error.code}: {error.message} {detail}".strip()
    return [
        status.id,
        f"cache: {status.state}",
        f"{_bar(status.progress)} {status.progress * 100:5.1f}%",
        f"{human_bytes(status.bytes_cached)} / {human_bytes(status.bytes_total)}",
        shards,
        _ago(status.last_used_at),
        ("hot " if status.hot else "") + ("pinned" if status.pinned else ""),
        detail,
    ]


_HEADERS = ["pipeline", "state", "progress", "size", "TP shards", "last used", "", "detail"]


def _table(statuses: Sequence[PipelineStatus]) -> Any:
    from rich.table import Table

    table = Table(header_style="bold", expand=False)
    for header in _HEADERS:
        table.add_column(header, no_wrap=header != "detail")
    for status in statuses:
        cells = _row(status)
        cells[1] = f"[{CHIP_STYLE[status.state]}]{cells[1]}[/]"
        table.add_row(*cells)
    return table


def print_status_table(statuses: Sequence[PipelineStatus]) -> None:
    """A table of pipelines (rich when installed, plain columns otherwise)."""
    if not statuses:
        print("no pipelines")
        return
    try:
        from rich.console import Console
    except ImportError:
        rows = [_HEADERS] + [_row(s) for s in statuses]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_HEADERS))]
        for row in rows:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        return
    Console(width=160).print(_table(statuses))


def watch_status(client: Client, pipeline_id: str | None, *, interval_s: float = 1.0) -> None:
    """A live table until Ctrl-C."""
    from rich.live import Live

    def statuses() -> list[PipelineStatus]:
        return [client.status(pipeline_id)] if pipeline_id else client.pipelines()

    with Live(_table(statuses()), refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(_table(statuses()))
        except KeyboardInterrupt:
            pass


def wait_with_progress(client: Client, pipeline_id: str) -> PipelineStatus:
    """Wait until warm with a progress bar of bytes cached; raises WarmFailed on failure."""
    try:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )
    except ImportError:
        return client.wait_until_warm(
            pipeline_id,
            on_status=lambda s: print(f"{s.id}: {s.state} {s.progress * 100:.1f}%"),
        )
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(binary_units=True),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task(f"warming {pipeline_id}", total=None)

        def update(status: PipelineStatus) -> None:
            progress.update(
                task,
                total=status.bytes_total or None,
                completed=status.bytes_cached,
                description=f"{pipeline_id}: {status.state}",
            )

        return client.wait_until_warm(pipeline_id, poll_s=0.2, on_status=update)
