"""HTTP ``Range`` header parsing (RFC 9110), for one range per request."""

from __future__ import annotations


class RangeNotSatisfiable(ValueError):
    """The range lies outside the resource (answered 416)."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a ``bytes=`` range, or None for the whole body.

    Multiple ranges and other units are answered with the whole body, as RFC 9110 allows a server
    to ignore a Range it does not support. Raises RangeNotSatisfiable for a range past the end.
    """
    if header is None:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if first == "":
            suffix = int(last)
            if suffix <= 0:
                raise RangeNotSatisfiable(header)
            return max(0, size - suffix), size
        start = int(first)
        end = size - 1 if last == "" else int(last)
    except ValueError:
        return None
    if start >= size:
        raise RangeNotSatisfiable(header)
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1) + 1
