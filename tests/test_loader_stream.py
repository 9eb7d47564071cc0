"""The stream engine: plans, local and HTTP sources, CPU and ring sinks, verification, failover."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import safetensors.torch
import torch
import xxhash

from api.schema import Manifest, ManifestBlob, ManifestTensor
from loader.errors import IntegrityError, SourceError
from loader.layout import plan_layout, tensor_view
from loader.manifest_stream import load_manifest, tensor_keys
from loader.ranges import BlobDigests, ByteRange, plan_requests
from loader.safetensors_format import read_header
from loader.sinks import RingSink, staging_pool
from loader.sources import Check, HttpRangeSource, LocalFileSource, blob_path
from loader.stream import stream
from tests.fixtures.blob_server import BlobServer

CHUNK = 4096  # small digest chunks, so a test file spans many of them


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(64, 48, generator=generator).bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(48, 48, generator=generator).half(),
        "model.layers.0.mlp.down_proj.weight": torch.randn(48, 96, generator=generator),
        "model.norm.weight": torch.randn(48, generator=generator).double(),
        "fp8": torch.randn(300, generator=generator).to(torch.float8_e4m3fn),
        "fp8b": torch.randn(17, generator=generator).to(torch.float8_e5m2),
        "ids": torch.arange(77, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
    }


def _publish(data_dir: Path, payload: bytes) -> str:
    sha = hashlib.sha256(payload).hexdigest()
    path = blob_path(data_dir, sha)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return sha


def _blob_entry(sha: str, payload: bytes) -> ManifestBlob:
    digests = [
        xxhash.xxh3_128_hexdigest(payload[i : i + CHUNK]) for i in range(0, len(payload), CHUNK)
    ]
    return ManifestBlob(sha256=sha, size=len(payload), chunk_size=CHUNK, chunk_xxh3_128=digests)


def make_store(
    tmp_path: Path, models: dict[str, list[dict[str, torch.Tensor]]]
) -> tuple[Path, Manifest, dict[str, torch.Tensor], list[Path]]:
    """Write safetensors files into a node-like data dir; the full-mode manifest of them all."""
    data_dir = tmp_path / "data"
    tensors: list[ManifestTensor] = []
    blobs: list[ManifestBlob] = []
    expected: dict[str, torch.Tensor] = {}
    files: list[Path] = []
    for model, shards in models.items():
        for index, shard in enumerate(shards):
            path = tmp_path / f"{model}-{index}.safetensors"
            safetensors.torch.save_file(shard, path)
            files.append(path)
            payload = path.read_bytes()
            sha = _publish(data_dir, payload)
            blobs.append(_blob_entry(sha, payload))
            header = read_header(path)
            for info in header.tensors:
                tensors.append(
                    ManifestTensor(
                        model=model,
                        name=info.name,
                        dtype=info.dtype,
                        shape=list(info.shape),
                        blob=sha,
                        offset=info.absolute_offset(header.data_offset),
                        length=info.nbytes,
                    )
                )
            loaded = safetensors.torch.load_file(path)
            key_prefix = f"{model}/" if len(models) > 1 else ""
            expected.update({key_prefix + name: t for name, t in loaded.items()})
    manifest = Manifest(
        pipeline="p",
        tp_size=1,
        rank=0,
        bytes_total=sum(t.length for t in tensors),
        files=[],
        tensors=tensors,
        blobs=blobs,
    )
    return data_dir, manifest, expected, files


def _assert_same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        got = actual[name]
        assert got.dtype == tensor.dtype, name
        assert got.shape == tensor.shape, name
        assert (
            got.contiguous().view(-1).view(torch.uint8).tolist()
            == tensor.contiguous().view(-1).view(torch.uint8).tolist()
        ), name


@pytest.fixture
def store(tmp_path: Path) -> tuple[Path, Manifest, dict[str, torch.Tensor], list[Path]]:
    return make_store(tmp_path, {"llm": [_tensors(1), {"lm_head.weight": torch.randn(80, 48)}]})


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    yield
    staging_pool.clear()


# ---------------------------------------------------------------------------------------------
# planning


def test_plan_merges_adjacent_ranges_and_splits_by_request_size() -> None:
    ranges = [ByteRange("b", 100, 50, 0), ByteRange("b", 150, 70, 50), ByteRange("b", 300, 10, 200)]
    requests = plan_requests(ranges, request_size=64)
    assert [(r.offset, r.length, r.pieces[0].dest) for r in requests] == [
        (100, 64, 0),
        (164, 56, 64),
        (300, 10, 200),
    ]
    assert all(r.direct for r in requests)


def test_plan_reads_shared_bytes_once() -> None:
    ranges = [ByteRange("b", 0, 16, 0), ByteRange("b", 0, 16, 0), ByteRange("b", 8, 16, 8)]
    assert [(r.offset, r.length) for r in plan_requests(ranges, request_size=1024)] == [(0, 24)]


def test_plan_with_digests_reads_whole_chunks() -> None:
    digests = {"b": BlobDigests(size=250, chunk_size=100, chunk_xxh3_128=("a", "b", "c"))}
    ranges = [ByteRange("b", 30, 100, 1000), ByteRange("b", 210, 40, 0)]
    requests = plan_requests(ranges, request_size=1 << 20, digests=digests)
    assert [(r.offset, r.length, r.chunk_digest) for r in requests] == [
        (0, 100, "a"),
        (100, 100, "b"),
        (200, 50, "c"),
    ]
    assert [(p.buffer_offset, p.dest, p.length) for p in requests[0].pieces] == [(30, 1000, 70)]
    assert [(p.buffer_offset, p.dest, p.length) for p in requests[1].pieces] == [(0, 1070, 30)]
    assert not requests[2].direct
    with pytest.raises(ValueError, match="past the end"):
        plan_requests([ByteRange("b", 240, 20, 0)], request_size=10, digests=digests)
    with pytest.raises(ValueError, match="no chunk digests"):
        plan_requests([ByteRange("x", 0, 1, 0)], request_size=10, digests=digests)


def test_layout_keeps_alignment_and_adjacency(store: tuple[Path, Manifest, object, object]) -> None:
    _, manifest, _, _ = store
    placements, ranges, size = plan_layout(manifest.tensors, keys=tensor_keys(manifest))
    for placement, tensor in zip(placements, manifest.tensors, strict=True):
        assert placement.dest % 256 == tensor.offset % 256
        assert placement.dest + placement.length <= size
    # Both blobs' tensors pack into few long reads (one per blob).
    assert len(plan_requests(ranges, request_size=1 << 30)) == 2


# ---------------------------------------------------------------------------------------------
# local files


def test_local_source_cpu_sink_matches_safetensors(
    store: tuple[Path, Manifest, dict[str, torch.Tensor], object],
) -> None:
    data_dir, manifest, expected, _ = store
    tensors, report = load_manifest(
        manifest, source=LocalFileSource(data_dir), request_size=1000, workers=4
    )
    _assert_same(tensors, expected)
    assert report.bytes_delivered == sum(t.length for t in manifest.tensors)
    assert report.requests > 10  # small requests: many reads in flight


def test_views_share_one_allocation(store: tuple[Path, Manifest, object, object]) -> None:
    data_dir, manifest, _, _ = store
    tensors, _ = load_manifest(manifest, source=LocalFileSource(data_dir))
    storages = {t.untyped_storage().data_ptr() for t in tensors.values() if t.numel()}
    assert len(storages) == 1


def test_ring_sink_on_cpu_with_more_requests_than_slots(
    store: tuple[Path, Manifest, dict[str, torch.Tensor], object],
) -> None:
    data_dir, manifest, expected, _ = store
    placements, ranges, size = plan_layout(manifest.tensors, keys=tensor_keys(manifest))
    sink = RingSink(size, device="cpu", slots=2, slot_size=512)
    source = LocalFileSource(data_dir)
    try:
        report = stream(ranges, source=source, sink=sink, request_size=512, workers=4)
    finally:
        sink.close()
        source.close()
    assert report.requests > 20
    _assert_same({p.key: tensor_view(sink.output, p) for p in placements}, expected)


def test_ring_sink_verified_with_tiny_ring(
    store: tuple[Path, Manifest, dict[str, torch.Tensor], object],
) -> None:
    data_dir, manifest, expected, _ = store
    placements, ranges, size = plan_layout(manifest.tensors, keys=tensor_keys(manifest))
    digests = {
        b.sha256: BlobDigests(b.size, b.chunk_size, tuple(b.chunk_xxh3_128)) for b in manifest.blobs
    }
    sink = RingSink(size, device="cpu", slots=3, slot_size=CHUNK)
    source = LocalFileSource(data_dir)
    try:
        report = stream(ranges, source=source, sink=sink, digests=digests, workers=4)
    finally:
        sink.close()
        source.close()
    assert report.verified_chunks == sum(len(b.chunk_xxh3_128) for b in manifest.blobs)
    _assert_same({p.key: tensor_view(sink.output, p) for p in placements}, expected)


def test_ring_refuses_a_request_larger_than_a_slot() -> None:
    sink = RingSink(100, device="cpu", slots=1, slot_size=8)
    try:
        with pytest.raises(ValueError, match="slot"):
            stream([ByteRange("b", 0, 16, 0)], source=_NullSource(), sink=sink, request_size=16)
    finally:
        sink.close()


class _NullSource:
    def prepare(self, blobs: object) -> None:
        return None

    def read_into(
        self, blob: str, offset: int, buffer: memoryview, *, check: Check | None = None
    ) -> None:
        buffer[:] = bytes(len(buffer))
        if check is not None:
            check(buffer)

    def close(self) -> None:
        return None


def test_verify_catches_a_flipped_byte_on_disk(
    store: tuple[Path, Manifest, object, object],
) -> None:
    data_dir, manifest, _, _ = store
    tensor = manifest.tensors[3]
    path = blob_path(data_dir, tensor.blob)
    payload = bytearray(path.read_bytes())
    payload[tensor.offset + tensor.length // 2] ^= 0x01
    path.write_bytes(bytes(payload))
    # Without verification the flip goes unnoticed; with it, the load fails naming the blob.
    load_manifest(manifest, source=LocalFileSource(data_dir))
    with pytest.raises(IntegrityError, match=tensor.blob):
        load_manifest(manifest, source=LocalFileSource(data_dir), verify=True)


def test_verified_load_matches(
    store: tuple[Path, Manifest, dict[str, torch.Tensor], object],
) -> None:
    data_dir, manifest, expected, _ = store
    tensors, report = load_manifest(manifest, source=LocalFileSource(data_dir), verify=True)
    _assert_same(tensors, expected)
    assert report.verified_chunks == sum(len(b.chunk_xxh3_128) for b in manifest.blobs)


def test_missing_and_short_blob_files(store: tuple[Path, Manifest, object, object]) -> None:
    data_dir, manifest, _, _ = store
    path = blob_path(data_dir, manifest.tensors[0].blob)
    payload = path.read_bytes()
    path.write_bytes(payload[: len(payload) // 2])
    with pytest.raises(SourceError, match="short"):
        load_manifest(manifest, source=LocalFileSource(data_dir))
    path.unlink()
    with pytest.raises(SourceError, match="cannot open"):
        load_manifest(manifest, source=LocalFileSource(data_dir))


def test_multi_model_keys(tmp_path: Path) -> None:
    data_dir, manifest, expected, _ = make_store(
        tmp_path, {"asr": [{"w": torch.randn(3, 4)}], "llm": [{"w": torch.randn(5).half()}]}
    )
    tensors, _ = load_manifest(manifest, source=LocalFileSource(data_dir))
    assert set(tensors) == {"asr/w", "llm/w"}
    _assert_same(tensors, expected)


# ---------------------------------------------------------------------------------------------
# HTTP


def test_http_source_matches_safetensors(
    store: tuple[Path, Manifest, dict[str, torch.Tensor], object],
) -> None:
    data_dir, manifest, expected, _ = store
    with BlobServer(data_dir, token="secret") as server:
        source = HttpRangeSource([server.url], token="secret", connections=2)
        tensors, report = load_manifest(manifest, source=source, request_size=1500, workers=4)
    _assert_same(tensors, expected)
    assert report.requests > 5


def test_http_wrong_token_fails_clearly(store: tuple[Path, Manifest, object, object]) -> None:
    data_dir, manifest, _, _ = store
    with BlobServer(data_dir, token="secret") as server:
        source = HttpRangeSource([server.url], token="wrong", connections=1)
        with pytest.raises(SourceError, match="401"):
            load_manifest(manifest, source=source)


@pytest.mark.parametrize("fault", ["down", "short", "wrong_range", "ignore_range"])
def test_http_fails_over_to_the_next_node(
    fault: str, store: tuple[Path, Manifest, dict[str, torch.Tensor], object]
) -> None:
    data_dir, manifest, expected, _ = store
    with BlobServer(data_dir) as bad, BlobServer(data_dir) as good:
        bad.state.fault = fault
        source = HttpRangeSource([bad.url, good.url], connections=2)
        tensors, _ = load_manifest(manifest, source=source, request_size=2000, workers=4)
        assert bad.state.requests >= 1
        assert good.state.requests >= 1
    _assert_same(tensors, expected)


@pytest.mark.parametrize("fault", ["short", "wrong_range", "ignore_range", "down"])
def test_http_single_bad_node_is_an_error(
    fault: str, store: tuple[Path, Manifest, object, object]
) -> None:
    data_dir, manifest, _, _ = store
    with BlobServer(data_dir) as bad:
        source = HttpRangeSource([bad.url], connections=1)
        source.prepare([])
        bad.state.fault = fault
        with pytest.raises(SourceError, match="every cache node failed"):
            load_manifest(manifest, source=source, request_size=2000, workers=2)


def test_unreachable_first_node_fails_over(
    store: tuple[Path, Manifest, dict[str, torch.Tensor], object],
) -> None:
    data_dir, manifest, expected, _ = store
    with BlobServer(data_dir) as dead:
        dead_url = dead.url
    with BlobServer(data_dir) as good:
        source = HttpRangeSource([dead_url, good.url], connections=2)
        tensors, _ = load_manifest(manifest, source=source, request_size=1000, workers=4)
    _assert_same(tensors, expected)


def test_verify_catches_a_bit_flipped_in_transit(
    store: tuple[Path, Manifest, object, object],
) -> None:
    data_dir, manifest, _, _ = store
    with BlobServer(data_dir) as server:
        server.state.fault = "flip"
        source = HttpRangeSource([server.url], connections=1)
        with pytest.raises(IntegrityError):
            load_manifest(manifest, source=source, verify=True)


# ---------------------------------------------------------------------------------------------
# the package surface


def test_loader_imports_without_server_dependencies() -> None:
    code = (
        "import sys, loader, loader.loading\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} & {'fastapi', 'starlette', "
        "'uvicorn', 'diskcache', 'boto3', 'botocore', 'aiobotocore', 'cache_node', "
        "'safetensors'})\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])


def test_exported_members() -> None:
    import loader

    # a node's error answers are the client side's one tree, re-exported for the loader's users
    shared = {"NotWarmError", "ServerError"}
    for name in loader.__all__:
        module = getattr(loader, name).__module__
        assert module == "clients.errors" if name in shared else module.startswith("loader."), name
    assert {"load", "load_all_ranks", "stream", "parse_header", "HeaderError"} <= set(
        loader.__all__
    )
