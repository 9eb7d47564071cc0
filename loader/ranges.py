"""Byte ranges to stream, and the plan of read requests that covers them.

A load is a list of :class:`ByteRange`: ``length`` bytes at ``offset`` of blob ``blob`` land at
``dest`` of one flat output allocation. :func:`plan_requests` turns them into
:class:`ReadRequest` s, the unit a worker thread reads in one go:

- without verification, ranges that are adjacent both in the blob and in the destination are
  merged, then cut into requests of at most ``request_size`` bytes, each read straight into its
  destination;
- with verification, every request is one whole digest chunk of the blob (the digests cover
  chunks aligned to the blob start), and the pieces of it that some range needs are copied out
  after the chunk is checked. Bytes of a chunk nobody asked for are read and hashed, then dropped.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

__all__ = ["BlobDigests", "ByteRange", "Piece", "ReadRequest", "plan_requests"]


@dataclass(frozen=True, slots=True)
class ByteRange:
    """``length`` bytes at ``offset`` of blob ``blob`` (a sha256) go to ``dest`` of the output."""

    blob: str
    offset: int
    length: int
    dest: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True, slots=True)
class BlobDigests:
    """A blob's per-chunk xxh3-128 digests (hex), chunks aligned to the blob's first byte."""

    size: int
    chunk_size: int
    chunk_xxh3_128: tuple[str, ...]

    def chunk_span(self, index: int) -> tuple[int, int]:
        """``(start, end)`` of chunk ``index`` in the blob."""
        start = index * self.chunk_size
        return start, min(start + self.chunk_size, self.size)


@dataclass(frozen=True, slots=True)
class Piece:
    """``length`` bytes at ``buffer_offset`` of a request's buffer go to ``dest``."""

    buffer_offset: int
    dest: int
    length: int


@dataclass(frozen=True, slots=True)
class ReadRequest:
    """One read: ``length`` bytes at ``offset`` of ``blob``, delivered as ``pieces``.

    ``direct`` requests have one piece covering the whole buffer, so a sink can hand out the
    destination itself as the buffer. ``chunk_digest`` is set when the whole request is one
    digest chunk to check before its pieces are delivered.
    """

    blob: str
    offset: int
    length: int
    pieces: tuple[Piece, ...]
    chunk_digest: str | None = None

    @property
    def direct(self) -> bool:
        return (
            len(self.pieces) == 1
            and self.pieces[0].buffer_offset == 0
            and self.pieces[0].length == self.length
        )


def plan_requests(
    ranges: Iterable[ByteRange],
    *,
    request_size: int,
    digests: Mapping[str, BlobDigests] | None = None,
) -> list[ReadRequest]:
    """The read requests that deliver every byte of ``ranges``, in blob and offset order.

    With ``digests`` (every blob of ``ranges`` must be in it), requests are whole chunks and
    carry the digest to check. Raises ``ValueError`` for a negative range, a range past a
    blob's end (when its size is known) or a missing digest entry.
    """
    if request_size <= 0:
        raise ValueError("request_size must be positive")
    by_blob: dict[str, list[ByteRange]] = defaultdict(list)
    for item in ranges:
        if item.offset < 0 or item.length < 0 or item.dest < 0:
            raise ValueError(f"negative offset, length or dest in {item}")
        if item.length:
            by_blob[item.blob].append(item)
    requests: list[ReadRequest] = []
    for blob in sorted(by_blob):
        items = sorted(by_blob[blob], key=lambda r: (r.offset, r.dest))
        if digests is None:
            requests.extend(_direct_requests(blob, _merge(items), request_size))
            continue
        if blob not in digests:
            raise ValueError(f"no chunk digests for blob {blob}")
        requests.extend(_chunk_requests(blob, items, digests[blob]))
    return requests


def _merge(items: Sequence[ByteRange]) -> list[ByteRange]:
    # Ranges that touch or overlap with the same blob-to-destination mapping become one (tied
    # weights name the same bytes twice; they are read once).
    merged: list[ByteRange] = []
    for item in items:
        last = merged[-1] if merged else None
        if (
            last is not None
            and item.offset <= last.end
            and item.dest - item.offset == last.dest - last.offset
        ):
            end = max(last.end, item.end)
            merged[-1] = ByteRange(last.blob, last.offset, end - last.offset, last.dest)
        else:
            merged.append(item)
    return merged


def _direct_requests(
    blob: str, merged: Sequence[ByteRange], request_size: int
) -> list[ReadRequest]:
    requests = []
    for item in merged:
        for start in range(0, item.length, request_size):
            length = min(request_size, item.length - start)
            requests.append(
                ReadRequest(
                    blob=blob,
                    offset=item.offset + start,
                    length=length,
                    pieces=(Piece(0, item.dest + start, length),),
                )
            )
    return requests


def _chunk_requests(
    blob: str, items: Sequence[ByteRange], digests: BlobDigests
) -> list[ReadRequest]:
    pieces_by_chunk: dict[int, list[Piece]] = defaultdict(list)
    for item in items:
        if item.end > digests.size:
            raise ValueError(f"range {item} runs past the end of the {digests.size}-byte blob")
        position = item.offset
        while position < item.end:
            index = position // digests.chunk_size
            chunk_start, chunk_end = digests.chunk_span(index)
            length = min(chunk_end, item.end) - position
            pieces_by_chunk[index].append(
                Piece(position - chunk_start, item.dest + position - item.offset, length)
            )
            position += length
    requests = []
    for index in sorted(pieces_by_chunk):
        if index >= len(digests.chunk_xxh3_128):
            raise ValueError(f"blob {blob} has no digest for chunk {index}")
        chunk_start, chunk_end = digests.chunk_span(index)
        requests.append(
            ReadRequest(
                blob=blob,
                offset=chunk_start,
                length=chunk_end - chunk_start,
                pieces=tuple(_merge_pieces(pieces_by_chunk[index])),
                chunk_digest=digests.chunk_xxh3_128[index],
            )
        )
    return requests


def _merge_pieces(pieces: list[Piece]) -> list[Piece]:
    merged: list[Piece] = []
    for piece in sorted(pieces, key=lambda p: (p.buffer_offset, p.dest)):
        last = merged[-1] if merged else None
        if (
            last is not None
            and piece.buffer_offset <= last.buffer_offset + last.length
            and piece.dest - piece.buffer_offset == last.dest - last.buffer_offset
        ):
            end = max(last.buffer_offset + last.length, piece.buffer_offset + piece.length)
            merged[-1] = Piece(last.buffer_offset, last.dest, end - last.buffer_offset)
        else:
            merged.append(piece)
    return merged
