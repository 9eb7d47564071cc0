"""HTTP ``Range`` requests (RFC 9110 §14) for blobs: the one parser both ports use.

The API's ``GET /v1/blobs/{sha256}`` and the data plane answer a blob request from
:func:`plan_blob_response`, so the same request gets the same status and headers on both ports.
What the node does, rule by rule (RFC 9110 allows a server to ignore a Range it does not
support, so "ignored" below means a 200 with the whole blob):

- Only ``GET`` applies a Range (§14.2: range handling is defined for GET only). ``HEAD``
  answers with the headers of a plain ``GET`` (200, the full ``Content-Length``) and no body.
- The grammar is exact (§14.1.1): ``bytes=`` (unit case-insensitive) then ``first-last``,
  ``first-`` or ``-suffix`` where every number is ASCII digits only. Anything else is an invalid
  ranges-specifier and is ignored: other units, signs (``+1``), underscores (``1_0``),
  non-ASCII digits (``١٢``, which Python's ``int()`` would accept), whitespace inside a range
  or around ``=``, a last-pos below the first-pos (``5-1``), or more than one Range field.
  Optional whitespace is allowed only around the commas of the list, and empty list elements
  are skipped (§5.6.1.2).
- More than one range (``bytes=0-1,5-6``) is ignored: the node does not send
  ``multipart/byteranges``, and ignoring is what §14.2 allows.
- ``If-Range``: the Range applies only when it equals the blob's strong ETag; otherwise (a date,
  a weak or another tag) the Range is ignored (§13.1.5).
- A valid single range that is not satisfiable (a first-pos at or past the end, ``bytes=-0``,
  any int-range on an empty blob) is a 416 with ``Content-Range: bytes */SIZE``.
- A satisfiable range is a 206; a last-pos past the end is clipped, a suffix longer than the
  blob takes the whole blob. On an empty blob the only satisfiable form is a non-zero suffix
  (§14.1.1), whose range is empty and cannot be written as a ``Content-Range``: it is a 200
  with the (empty) whole.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

__all__ = ["BlobAnswer", "RangeNotSatisfiable", "parse_range", "plan_blob_response"]

_DIGITS = frozenset("0123456789")
#: More digits than any size can have: such a number is simply "past every end".
_MAX_DIGITS = 30


class RangeNotSatisfiable(ValueError):
    """The range lies outside the resource (answered 416)."""


def _number(text: str) -> int | None:
    """A non-negative integer written in ASCII digits only, or None (``int()`` is too lenient:
    it takes signs, underscores, whitespace and any Unicode digit)."""
    if not text or not set(text) <= _DIGITS:
        return None
    text = text.lstrip("0") or "0"
    # Huge values stay exact but cheap to compare (int() refuses over 4,300 digits).
    return int(text) if len(text) <= _MAX_DIGITS else 10**_MAX_DIGITS


def _specs(header: str) -> list[tuple[int | None, int | None]] | None:
    """The range-specs of a ``bytes=`` header as (first, last) with None for absent parts;
    None when the header is not a valid bytes ranges-specifier."""
    unit, equals, range_set = header.partition("=")
    if not equals or not unit.isascii() or unit.lower() != "bytes":
        return None
    specs: list[tuple[int | None, int | None]] = []
    for element in range_set.split(","):
        element = element.strip(" \t")
        if not element:
            continue  # empty list elements are allowed and ignored
        first_text, dash, last_text = element.partition("-")
        if not dash:
            return None
        if first_text == "":
            suffix = _number(last_text)
            if suffix is None:
                return None
            specs.append((None, suffix))
            continue
        first = _number(first_text)
        last = None if last_text == "" else _number(last_text)
        if first is None or (last_text != "" and last is None):
            return None
        if last is not None and last < first:
            return None  # an invalid int-range makes the whole specifier invalid
        specs.append((first, last))
    if not specs or range_set != range_set.strip(" \t"):
        return None  # "bytes=" alone, or whitespace right after "=" (not a list separator)
    return specs


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """``[start, end)`` of a single ``bytes=`` range, or None when the Range is ignored.

    Raises RangeNotSatisfiable for a valid range that selects nothing of a ``size``-byte body.
    """
    if header is None:
        return None
    specs = _specs(header.strip(" \t"))  # a field value's own OWS is not part of it
    if specs is None or len(specs) != 1:
        return None
    first, last = specs[0]
    if first is None:
        assert last is not None
        if last == 0:
            raise RangeNotSatisfiable(header)
        if size == 0:
            return None  # satisfiable, but an empty range has no Content-Range: the whole
        return max(0, size - last), size
    if first >= size:
        raise RangeNotSatisfiable(header)
    end = size if last is None else min(last + 1, size)
    return first, end


@dataclass(frozen=True)
class BlobAnswer:
    """How to answer one blob request: status, headers, the byte span and whether to send it.

    ``status`` is 200, 206 or 416; a 416 carries ``Content-Range: bytes */SIZE`` and the
    caller writes its JSON error body (without ``Content-Length`` here). ``headers`` never
    includes ``Content-Type``, which each server sets its own way.
    """

    status: int
    start: int
    end: int
    send_body: bool
    headers: dict[str, str] = field(default_factory=dict)


def plan_blob_response(
    *,
    method: str,
    range_fields: Sequence[str],
    if_range: str | None,
    sha256: str,
    size: int,
) -> BlobAnswer:
    """The answer to ``method`` on a ``size``-byte blob given its request's Range fields.

    ``range_fields`` are all the Range header fields of the request (a request with two is
    ignored as malformed); ``if_range`` the If-Range field, if any.
    """
    etag = f'"{sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes"}
    span: tuple[int, int] | None = None
    applies = (
        method == "GET"
        and len(range_fields) == 1
        and (if_range is None or if_range.strip() == etag)
    )
    if applies:
        try:
            span = parse_range(range_fields[0], size)
        except RangeNotSatisfiable:
            headers["Content-Range"] = f"bytes */{size}"
            return BlobAnswer(status=416, start=0, end=0, send_body=False, headers=headers)
    start, end = span if span is not None else (0, size)
    if span is not None:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    headers["Content-Length"] = str(end - start)
    return BlobAnswer(
        status=206 if span is not None else 200,
        start=start,
        end=end,
        send_body=method != "HEAD",
        headers=headers,
    )
