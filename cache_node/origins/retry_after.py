"""``Retry-After`` (RFC 9110 §10.2.3) for every origin: one parser, liberal and never raising.

The header is delta-seconds or an HTTP date. Origins and proxies in the wild also send decimals
(``1.5``) and dates with a ``-0000`` zone (which :func:`email.utils.parsedate_to_datetime` returns
as a naive datetime); both are accepted. Anything else (``nan``, ``inf``, negative numbers, words)
means "no advice": the caller's own backoff applies, and a retryable error stays retryable.
"""

from __future__ import annotations

import email.utils
import math
import re
from datetime import UTC, datetime

_SECONDS = re.compile(r"[0-9]+(?:\.[0-9]+)?")


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` value, or None when it gives no usable advice."""
    if not value:
        return None
    text = value.strip()
    if _SECONDS.fullmatch(text):
        seconds = float(text)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": a UTC time whose zone is unknown to the sender
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
