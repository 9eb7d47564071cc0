"""Terminal rendering of pipeline status: chips, progress bars, a live table (rich when present)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from api.schema import PipelineStatus, RegionInfo
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


def _detail(status: PipelineStatus) -> str:
    if status.error is not None:
        detail = f"{status.error.code}: {status.error.message}"
        if status.error.retry_at:
            retry = datetime.fromtimestamp(status.error.retry_at).strftime("%H:%M:%S")
            detail += f" (retry {retry}, attempt {status.error.attempts or 1})"
        else:
            detail += " (waits for a person: weightcache warm ID)"
    elif status.evicted_reason:
        detail = f"evicted: {status.evicted_reason}"
    else:
        detail = ""
    if status.pending is not None:
        detail = f"new spec filling {status.pending.progress * 100:.0f}% {detail}".strip()
    elif status.last_attempt is not None and status.last_attempt.error is not None:
        error = status.last_attempt.error
        detail = f"new spec failed: {error.code}: {error.message} {detail}".strip()
    return detail


def _sizes(cached: int, total: int) -> str:
    """``7.5 / 15.0 GiB``: one unit when both share it."""
    left, right = human_bytes(cached), human_bytes(total)
    if left.split()[-1] == right.split()[-1]:
        return f"{left.split()[0]} / {right}"
    return f"{left} / {right}"


def _row(status: PipelineStatus, *, bar: bool = True) -> list[str]:
    # bytes_total counts the model files and the stored TP copies (one shard file per rank):
    # the size column shows the weights, the TP column what the copies add on disk
    weights = sum(m.bytes_total for m in status.models)
    copies = max(0, status.bytes_total - weights)
    shards = " ".join(
        f"tp{tp}:{'✓' if state == 'ready' else '…'}" for tp, state in status.shards.items()
    )
    if copies:
        shards += f" +{human_bytes(copies)}"
    return [
        status.id,
        f"cache: {status.state}",
        (f"{_bar(status.progress)} " if bar else "") + f"{status.progress * 100:5.1f}%",
        _sizes(max(0, min(weights, status.bytes_cached - copies)), weights),
        shards,
        _ago(status.last_used_at),
        " ".join(flag for flag, on in (("hot", status.hot), ("pinned", status.pinned)) if on),
    ]


_HEADERS = ["pipeline", "state", "progress", "weights", "TP shards (+copies)", "last used", ""]
#: Below this many columns the progress bar gives way to the percentage alone.
_BAR_MIN_WIDTH = 110
#: A longer pipeline id is cut with "…" (``status ID`` and ``--json`` show it whole).
_ID_MAX_WIDTH = 28


def _fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(0, width - 1)] + "…"


def _table(statuses: Sequence[PipelineStatus], *, width: int) -> Any:
    """One line per pipeline within ``width`` columns, then one line per failure reason."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    rows = [_row(status, bar=width >= _BAR_MIN_WIDTH) for status in statuses]
    natural = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(_HEADERS)]
    others = sum(natural[1:]) + 2 * (len(_HEADERS) - 1)  # two spaces between columns
    id_width = max(8, min(_ID_MAX_WIDTH, natural[0], width - others))
    table = Table(header_style="bold", expand=False, box=None, pad_edge=False,
                  padding=(0, 1), collapse_padding=True)
    for header in _HEADERS:
        if header == "pipeline":
            table.add_column(header, no_wrap=True, overflow="ellipsis", min_width=id_width,
                             max_width=id_width)
        else:
            table.add_column(header, no_wrap=True)
    for status, cells in zip(statuses, rows, strict=True):
        cells[1] = f"[{CHIP_STYLE[status.state]}]{cells[1]}[/]"
        table.add_row(*cells)
    reasons = [
        Text(_fit(f"  {status.id}: {detail}", width), style="red" if status.error else "")
        for status in statuses
        if (detail := _detail(status))
    ]
    return Group(table, *reasons) if reasons else table


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
        for status in statuses:
            if detail := _detail(status):
                print(f"  {status.id}: {detail}")
        return
    console = Console()  # the terminal's width, or $COLUMNS when not a terminal
    console.print(_table(statuses, width=console.width))


def print_region(region: RegionInfo) -> None:
    """The region's nodes (state, space, last beat) and the copies of each pipeline."""
    print(f"\nregion {region.region}: {len(region.nodes)} node(s)"
          + ("" if region.connected else " (Redis unreachable: this node only)"))
    rows = [["node", "state", "used", "free", "capacity", "beat", "url"]] + [
        [n.node_id, n.state, human_bytes(n.used), human_bytes(n.free),
         human_bytes(n.capacity), _ago(n.last_heartbeat), n.data_url or n.url]
        for n in region.nodes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    if region.pipelines:
        copies = ", ".join(
            f"{p.id} ×{p.copies}" + (f" ({' '.join(p.nodes)})" if p.nodes else "")
            for p in region.pipelines
        )
        print(f"  copies: {copies}")


def watch_status(client: Client, pipeline_id: str | None, *, interval_s: float = 1.0) -> None:
    """A live table until Ctrl-C."""
    from rich.live import Live

    def statuses() -> list[PipelineStatus]:
        return [client.status(pipeline_id)] if pipeline_id else client.pipelines()

    from rich.console import Console

    console = Console()
    with Live(_table(statuses(), width=console.width), console=console,
              refresh_per_second=4) as live:
        try:
            while True:
                time.sleep(interval_s)
                live.update(_table(statuses(), width=console.width))
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
