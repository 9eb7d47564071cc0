"""Structured events: one log line for every state change and failure (I6, I10).

Every event goes through :func:`emit`, which logs ``event`` plus keyword fields on the
``weightcache.events`` logger. :func:`configure_logging` renders them as one JSON object per line
(``serve --log-format json``) or as ``event key=value ...`` text. Secrets never reach a line:
fields whose name says token, secret, password or authorization are dropped to ``***``, and any
URL has its query string (where signed URLs carry their signatures) and credentials removed.

Event names (the ``event`` field), so that operators can alert on them:

- ``pipeline.registered``, ``pipeline.deleted``, ``pipeline.evicted`` (with ``reason``)
- ``warm.started``, ``warm.finished``, ``warm.failed`` (with ``code``), ``warm.retry_scheduled``,
  ``warm.retrying`` (``staged`` set: a re-registration filling beside a warm version),
  ``pipeline.registration_dropped`` (a staged re-registration replaced by the warm spec again)
- ``blob.quarantined`` (with ``reason``), ``disk.full`` (with ``where``), ``disk.recovered``,
  ``disk.no_headroom``, ``shards.estimated`` (shard sizes not read ahead, with ``reason``)
- ``source.refused``, ``tenant.refused``, ``serve.refused`` (a tenant's source outside its
  allowance, a refused token, a node that must not start)
- ``data_plane.worker_restarted``, ``data_plane.worker_died``, ``data_plane.worker_restart_failed``
- ``region.unreachable``, ``region.reachable`` (with ``down_s``), ``region.rejoined`` /
  ``region.rejoin_failed`` (with ``reason``), ``region.heartbeat_failed``, ``region.bad_record``,
  ``region.lease_lost`` (with ``stage``), ``peer.refused`` (with ``reason``): ``cache_node.region``
- ``tokens.reloaded`` (a new version of the tokens file in force: ``process``, counts of
  ``entries``, ``added``, ``removed``, ``changed`` tokens, ``forced`` by SIGHUP),
  ``tokens.reload_failed`` (with ``reason``; the process keeps the tokens it last read)
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from typing import Any

logger = logging.getLogger("weightcache.events")

_SECRET_NAME = re.compile(r"token|secret|password|authorization|credential|signature", re.I)
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^/\s?#@]*@)?([^\s?#]*)(\?[^\s#]*)?", re.I)


def redact(text: str) -> str:
    """``text`` with the userinfo and query string of every URL in it removed."""

    def clean(match: re.Match[str]) -> str:
        scheme, _userinfo, rest, query = match.groups()
        return f"{scheme}{rest}{'?…' if query else ''}"

    return _URL.sub(clean, text)


def _clean(name: str, value: Any) -> Any:
    if _SECRET_NAME.search(name):
        return "***"
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    return redact(str(value))


def emit(event: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log one structured event; ``fields`` are redacted before they leave this function."""
    if not logger.isEnabledFor(level):
        return
    clean = {name: _clean(name, value) for name, value in fields.items()}
    logger.log(level, event, extra={"event_fields": clean})


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts``, ``level``, ``logger``, ``event``, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": redact(record.getMessage()),
        }
        line.update(getattr(record, "event_fields", {}))
        if record.exc_info:
            line["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time level event key=value ...``: for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "event_fields", {})
        pairs = " ".join(f"{k}={v}" for k, v in fields.items())
        when = time.strftime("%H:%M:%S", time.localtime(record.created))
        text = f"{when} {record.levelname.lower():7s} {redact(record.getMessage())}"
        if pairs:
            text = f"{text} {pairs}"
        if record.exc_info:
            text = f"{text}\n{redact(self.formatException(record.exc_info))}"
        return text


def configure_logging(fmt: str = "text", *, level: int = logging.INFO) -> None:
    """Send weightcache's loggers to stderr in ``fmt`` (``text`` or ``json``)."""
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger("weightcache")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
