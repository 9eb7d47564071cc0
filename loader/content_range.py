"""``Content-Range`` (RFC 9110 §14.4) as a range reader receives it: one parser for every reader.

The origins (a hub's 206 or 416, an S3 ``GetObject``) and the replica's HTTP source all check
that the bytes in a body are the ones they asked for; they all read the header here. Only the
``bytes`` unit and ASCII digits are understood; anything else is ``None``, which each caller
treats as an answer it cannot trust. Standard library only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = ["ContentRange", "parse_content_range", "parse_unsatisfied_range"]

_SATISFIED = re.compile(r"bytes ([0-9]+)-([0-9]+)/([0-9]+|\*)")
_UNSATISFIED = re.compile(r"bytes \*/([0-9]+)")


@dataclass(frozen=True, slots=True)
class ContentRange:
    """``bytes FIRST-LAST/SIZE``: the body holds bytes ``[first, last]`` of a ``size``-byte
    representation (``size`` None when the sender wrote ``*``: unknown)."""

    first: int
    last: int
    size: int | None


def parse_content_range(value: str | None) -> ContentRange | None:
    """The range a 206 body holds, or None when ``value`` is missing or not a byte range."""
    match = _SATISFIED.fullmatch((value or "").strip())
    if match is None:
        return None
    size = None if match[3] == "*" else int(match[3])
    return ContentRange(int(match[1]), int(match[2]), size)


def parse_unsatisfied_range(value: str | None) -> int | None:
    """The representation's size from a 416's ``bytes */SIZE``, or None."""
    match = _UNSATISFIED.fullmatch((value or "").strip())
    return None if match is None else int(match[1])
