"""Writing a shard plan: one safetensors file per rank, in one pass over the model.

``write_rank_shards(plan, sources, out_dir)`` reads each source tensor once (a bounded block at
a time) and writes every rank's slice of it, so one pass over the model writes all N files,
hashing them (sha256 and the store's chunk digests) while they are written. Files get unique
temporary names and are fsynced; the caller verifies, renames and records them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from cache_node.errors import IntegrityError, InvalidInput
from cache_node.sharding.plan import RankTensor, ShardPlan
from loader.digests import CHUNK_SIZE, BlobHasher
from loader.preads import read_into_at
from loader.safetensors_format import encode_header

__all__ = ["RankShardFile", "ShardTensorEntry", "write_rank_shards"]

#: How many source bytes are read at once while writing: memory stays bounded by about this
#: (plus one row when a single row is larger), whatever the model's size.
_BLOCK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class ShardTensorEntry:
    """A tensor of a written rank file: ``length`` bytes at absolute ``offset``."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    length: int


@dataclass(frozen=True)
class RankShardFile:
    """A rank's safetensors file as written (under a temporary name, fsynced, not published)."""

    rank: int
    tp_size: int
    path: Path
    size: int
    sha256: str
    chunk_size: int
    chunk_xxh3_128: tuple[str, ...]
    tensors: tuple[ShardTensorEntry, ...]


def write_rank_shards(
    plan: ShardPlan,
    sources: Mapping[str, Path],
    out_dir: Path,
    *,
    chunk_size: int = CHUNK_SIZE,
    block_size: int = _BLOCK_SIZE,
) -> list[RankShardFile]:
    """Write one safetensors file per rank of ``plan`` into ``out_dir``; ``[]`` in full mode.

    ``sources`` maps each safetensors file name the plan uses to its path. Files get unique
    temporary names and are fsynced; the caller verifies, renames and records them. On any
    error every file this call created is removed.
    """
    if plan.mode == "full":
        return []
    missing = {t.source.file for t in plan.ranks[0].tensors} - sources.keys()
    if missing:
        raise InvalidInput(f"no path given for source files {sorted(missing)}")
    writers: list[_HashingWriter] = []
    inputs: dict[str, BinaryIO] = {}
    # Each source file is opened on its first use and stays open until every rank is written.
    with contextlib.ExitStack() as opened:
        try:
            for rank_plan in plan.ranks:
                writers.append(
                    _HashingWriter.create(out_dir, plan.tp_size, rank_plan.rank, chunk_size)
                )
            headers = []
            for rank_plan, writer in zip(plan.ranks, writers, strict=True):
                header, starts = encode_header(
                    [(t.name, t.dtype, t.shape, t.nbytes) for t in rank_plan.tensors],
                    rank_plan.metadata,
                )
                writer.write(header)
                headers.append((len(header), starts))
            # Every rank lists the same source tensors in the same order (the plan builds them
            # so): one read of each source tensor feeds all the ranks' files.
            for pieces in zip(*(rank_plan.tensors for rank_plan in plan.ranks), strict=True):
                source = pieces[0].source
                if source.file not in inputs:
                    inputs[source.file] = opened.enter_context(
                        Path(sources[source.file]).open("rb")
                    )
                _copy_pieces(inputs[source.file], pieces, writers, block_size)
            results = []
            for rank_plan, writer, (header_len, starts) in zip(
                plan.ranks, writers, headers, strict=True
            ):
                writer.finish()
                entries = tuple(
                    ShardTensorEntry(t.name, t.dtype, t.shape, header_len + start, t.nbytes)
                    for t, start in zip(rank_plan.tensors, starts, strict=True)
                )
                results.append(writer.result(rank_plan.rank, plan.tp_size, entries))
            return results
        except BaseException:
            for writer in writers:
                writer.discard()
            raise


def _copy_pieces(
    source_file: BinaryIO,
    pieces: Sequence[RankTensor],
    writers: Sequence[_HashingWriter],
    block_size: int,
) -> None:
    source = pieces[0].source
    if all(piece.split == "replicated" for piece in pieces):
        for block in _read_blocks(source_file, source.offset, source.nbytes, block_size):
            for writer in writers:
                writer.write(block)
        return
    # Split tensors are viewed as [rows, row_bytes] of raw bytes: slicing bytes is the same for
    # every whole-byte dtype, so bf16, fp8 and fp32 need no conversion.
    rows = source.shape[0]
    row_bytes = source.nbytes // rows if rows else 0
    col_bytes = row_bytes // source.shape[1] if len(source.shape) > 1 and source.shape[1] else 0
    rows_per_block = max(1, block_size // max(row_bytes, 1))
    first = 0
    for block in _read_blocks(
        source_file, source.offset, source.nbytes, rows_per_block * row_bytes
    ):
        last = first + len(block) // row_bytes
        for piece, writer in zip(pieces, writers, strict=True):
            if piece.split == "replicated":
                writer.write(block)
            elif piece.split == "rows":
                lo, hi = max(first, piece.start), min(last, piece.stop)
                if lo < hi:
                    writer.write(block[(lo - first) * row_bytes : (hi - first) * row_bytes])
            else:
                grid = np.frombuffer(block, dtype=np.uint8).reshape(last - first, row_bytes)
                columns = grid[:, piece.start * col_bytes : piece.stop * col_bytes]
                writer.write(np.ascontiguousarray(columns).data)
        first = last
    for piece, writer in zip(pieces, writers, strict=True):
        writer.write_zeros(piece.pad_rows * row_bytes)


def _read_blocks(
    handle: BinaryIO, offset: int, length: int, block_size: int
) -> Iterator[memoryview]:
    """``length`` bytes from ``offset`` in blocks of at most ``block_size``, by positioned reads."""
    fd = handle.fileno()
    end = offset + length
    while offset < end:
        want = min(max(block_size, 1), end - offset)
        view = memoryview(bytearray(want))
        got = read_into_at(fd, view, offset)
        if got < want:
            # The plan came from this file's header: a shorter file is a damaged blob.
            raise IntegrityError(
                f"source file ends at byte {offset + got}; a tensor needs bytes up to {end}"
            )
        offset += want
        yield view


class _HashingWriter:
    """A temp file that hashes (sha256 and per-chunk xxh3-128) everything written to it."""

    _ZEROS = bytes(1024 * 1024)

    def __init__(self, path: Path, handle: BinaryIO, chunk_size: int) -> None:
        self.path = path
        self._handle = handle
        self._hasher = BlobHasher(chunk_size=chunk_size)

    @classmethod
    def create(cls, out_dir: Path, tp_size: int, rank: int, chunk_size: int) -> _HashingWriter:
        # A unique name per writer: two shard jobs for one model never write the same file.
        fd, name = tempfile.mkstemp(
            dir=out_dir, prefix=f".tp{tp_size}-rank{rank}-", suffix=".safetensors.tmp"
        )
        return cls(Path(name), os.fdopen(fd, "wb"), chunk_size)

    def write(self, data: bytes | memoryview) -> None:
        # Flat bytes: a numpy buffer's memoryview is n-dimensional and len() counts its rows.
        view = memoryview(data).cast("B")
        self._handle.write(view)
        self._hasher.update(view)

    def write_zeros(self, count: int) -> None:
        while count > 0:
            take = min(count, len(self._ZEROS))
            self.write(self._ZEROS[:take])
            count -= take

    def finish(self) -> None:
        """Flush and fsync: the bytes are on disk before anyone hashes or publishes them."""
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()

    def discard(self) -> None:
        self._handle.close()
        self.path.unlink(missing_ok=True)

    def result(
        self, rank: int, tp_size: int, tensors: tuple[ShardTensorEntry, ...]
    ) -> RankShardFile:
        return RankShardFile(
            rank=rank,
            tp_size=tp_size,
            path=self.path,
            size=self._hasher.size,
            sha256=self._hasher.sha256_hex,
            chunk_size=self._hasher.chunk_size,
            chunk_xxh3_128=tuple(self._hasher.chunks()),
            tensors=tensors,
        )
