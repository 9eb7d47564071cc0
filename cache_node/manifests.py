"""What a replica rank reads: manifests built from a warm pipeline's record and its blobs."""

from __future__ import annotations

import logging

from api.schema import Manifest, ManifestBlob, ManifestFile, ManifestTensor, PipelineFile
from cache_node.errors import InvalidCheckpoint, InvalidInput, NotWarm
from cache_node.registry import PipelineRecord
from cache_node.shard_sets import is_current
from cache_node.store import BlobRecord, BlobStore
from loader.errors import HeaderError
from loader.preads import read_at
from loader.safetensors_format import SafetensorsHeader, read_header

log = logging.getLogger("weightcache.node")


class ManifestBuilder:
    """Builds manifests; remembers each weights blob's parsed header (blobs never change)."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self._headers: dict[str, SafetensorsHeader] = {}

    def forget(self, sha256: str) -> None:
        """Drop what is remembered of a blob (it was quarantined)."""
        self._headers.pop(sha256, None)

    def build(self, record: PipelineRecord, *, tp_size: int, rank: int) -> Manifest:
        """The manifest of rank ``rank`` at ``tp_size`` of a warm pipeline."""
        if tp_size not in record.spec.tp_sizes:
            raise InvalidInput(
                f"tp_size {tp_size} not registered (have {record.spec.tp_sizes})", field="tp_size"
            )
        if not 0 <= rank < tp_size:
            raise InvalidInput(f"rank must be in [0, {tp_size})", field="rank")
        shard_set = record.shards[str(tp_size)]
        if not is_current(shard_set):
            # Cut by an older rule: its ranks would load into the engine and be wrong.
            raise NotWarm(
                f"pipeline {record.id!r}: the tp_size {tp_size} shards were cut by layout "
                f"{shard_set.layout!r}, not the current one; warm the pipeline to rebuild them",
                state="cold",
            )
        files: list[ManifestFile] = []
        tensors: list[ManifestTensor] = []
        for model in record.models:
            for file in model.files:
                assert file.blob is not None
                weights = self._file_tensors(model.name, file.blob, file.path)
                if weights is None:
                    files.append(
                        ManifestFile(
                            model=model.name, path=file.path, blob=file.blob, size=file.size
                        )
                    )
                elif shard_set.mode == "full":
                    tensors.extend(weights)
        if shard_set.mode == "sharded":
            for shard in shard_set.ranks:
                if shard.rank == rank:
                    tensors.extend(shard.tensors)
        blobs = []
        for sha in sorted({t.blob for t in tensors} | {f.blob for f in files}):
            blob = self.store.get(sha)
            if blob is None:
                raise NotWarm(f"pipeline {record.id!r} lost blob {sha}", state="cold")
            blobs.append(_manifest_blob(blob))
        return Manifest(
            pipeline=record.id,
            tp_size=tp_size,
            rank=rank,
            bytes_total=sum(t.length for t in tensors) + sum(f.size for f in files),
            files=files,
            tensors=tensors,
            blobs=blobs,
            mode=shard_set.mode,
            layout=shard_set.layout if shard_set.mode == "sharded" else None,
        )

    def files(self, record: PipelineRecord) -> list[PipelineFile]:
        """Every origin file of a pipeline with its blob."""
        return [
            PipelineFile(
                model=m.name, path=f.path, blob=f.blob or "", size=f.size, verified=f.verified
            )
            for m in record.models
            for f in m.files
        ]

    def verify_blob(self, sha256: str, *, header_only: bool = False) -> None:
        """Check a blob's chunks (only those of its safetensors header with ``header_only``);
        a mismatch quarantines it and raises IntegrityError."""
        record, handle = self.store.open(sha256)
        with handle:
            end = record.size
            if header_only and record.size >= 8:
                header_size = int.from_bytes(read_at(handle.fileno(), 8, 0), "little")
                end = min(record.size, 8 + header_size)
            self.store.verify_range(record, handle, 0, end)

    def _file_tensors(self, model: str, blob: str, path: str) -> list[ManifestTensor] | None:
        """The tensors of a safetensors file; None for any other file. An unparsable one is
        refused (``invalid_checkpoint``), never handed to a replica as a plain file: the warm
        job checked it, so this is a blob that changed under a warm pipeline."""
        if not path.endswith(".safetensors"):
            return None
        header = self._headers.get(blob)
        if header is None:
            try:
                self.verify_blob(blob, header_only=True)  # offsets must come from good bytes
                header = read_header(self.store.blob_path(blob))
            except (HeaderError, OSError) as exc:
                log.warning("%s is not a readable safetensors file: %s", path, exc)
                raise InvalidCheckpoint(
                    f"{model}/{path} is not a readable safetensors file: {exc}",
                    model=model,
                    path=path,
                ) from None
            self._headers[blob] = header
        return [
            ManifestTensor(
                model=model,
                name=t.name,
                dtype=t.dtype,
                shape=list(t.shape),
                blob=blob,
                offset=header.data_offset + t.start,
                length=t.nbytes,
            )
            for t in header.tensors
        ]


def _manifest_blob(blob: BlobRecord) -> ManifestBlob:
    return ManifestBlob(
        sha256=blob.sha256,
        size=blob.size,
        chunk_size=blob.chunk_size,
        chunk_xxh3_128=list(blob.chunk_xxh3_128),
    )
