"""Streaming straight into existing parameters: correct bytes, and no second copy in memory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from api.schema import Manifest, ManifestTensor
from loader.param_sink import ParamSink, plan_param_stream
from loader.sources import Check
from loader.stream import stream
from loader.vllm_weights import WeightMismatch
from tests.fixtures.param_memory import row_values

ROOT = Path(__file__).resolve().parent.parent
BLOB = "ab" + "0" * 62
ROWS, COLUMNS, COUNT = 2048, 4096, 8  # 8 tensors of 32 MiB in fp32: 256 MiB of parameters


class BytesSource:
    """A source over bytes in memory (the stream engine's Source protocol)."""

    def __init__(self, blobs: dict[str, bytes]) -> None:
        self.blobs = blobs

    def prepare(self, blobs: object) -> None:
        return None

    def read_into(
        self, blob: str, offset: int, buffer: memoryview, *, check: Check | None = None
    ) -> None:
        buffer[:] = self.blobs[blob][offset : offset + len(buffer)]
        if check is not None:
            check(buffer)

    def close(self) -> None:
        return None


def _write_blob(data_dir: Path, dtype: torch.dtype, name: str = BLOB) -> Manifest:
    path = data_dir / "blobs" / name[:2] / name
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = []
    offset = 0
    with path.open("wb") as out:
        for index in range(COUNT):
            tensor = row_values(COLUMNS, index).to(dtype).expand(ROWS, COLUMNS).contiguous()
            data = tensor.view(torch.uint8).numpy().tobytes()
            out.write(data)
            code = {torch.float32: "F32", torch.bfloat16: "BF16"}[dtype]
            tensors.append(
                ManifestTensor(
                    model="m", name=f"layer.{index}.weight", dtype=code,
                    shape=[ROWS, COLUMNS], blob=name, offset=offset, length=len(data),
                )
            )
            offset += len(data)
    return Manifest(
        pipeline="p", tp_size=1, rank=0, bytes_total=offset, files=[], tensors=tensors,
        mode="sharded",
    )


def _peak_growth(tmp_path: Path, manifest: Manifest, mode: str, engine: str) -> dict[str, int]:
    manifest_path = tmp_path / f"{mode}-{engine}.json"
    manifest_path.write_text(manifest.model_dump_json())
    result = subprocess.run(
        [sys.executable, "-m", "tests.fixtures.param_memory",
         str(tmp_path / "data"), str(manifest_path), mode, engine],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    answer: dict[str, int] = json.loads(result.stdout.strip().splitlines()[-1])
    print(mode, engine, answer)
    return answer


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_loading_into_parameters_needs_only_the_ring(tmp_path: Path) -> None:
    weights = ROWS * COLUMNS * 4 * COUNT  # 256 MiB of fp32 parameters
    slack = 8 << 20  # a few MiB: Python objects, thread stacks, allocator slop
    same = _write_blob(tmp_path / "data", torch.float32)
    direct = _peak_growth(tmp_path, same, "direct", "float32")
    assert direct["growth"] <= direct["ring"] + slack, direct
    # bf16 checkpoint, fp32 engine: cast per staging buffer, still no second copy
    cast = _write_blob(tmp_path / "data", torch.bfloat16, name="cd" + "0" * 62)
    casting = _peak_growth(tmp_path, cast, "direct", "float32")
    assert casting["growth"] <= casting["ring"] + slack, casting
    # Full-tensor mode's iterator: one batch (here the same budget) at a time, never the model.
    batches = _peak_growth(tmp_path, same, "iter", "float32")
    assert batches["growth"] <= batches["ring"] + slack, batches
    # The old path (a fresh flat allocation, then copy_) holds the weights twice.
    flat = _peak_growth(tmp_path, same, "flat", "float32")
    assert flat["growth"] > flat["ring"] + slack, flat
    assert flat["growth"] >= weights * 0.9, flat


@pytest.mark.parametrize("merge", [True, False])
@pytest.mark.parametrize("engine", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_and_split_reads_land_in_the_right_elements(
    merge: bool, engine: torch.dtype
) -> None:
    generator = torch.Generator().manual_seed(1)
    originals = [
        torch.randn(shape, generator=generator).to(dtype)
        for shape, dtype in [
            ((37, 11), torch.bfloat16), ((5,), torch.bfloat16), ((64, 3), torch.float32),
            ((3,), torch.float32), ((19, 7), torch.bfloat16),
        ]
    ]
    blob, tensors, offset = b"", [], 0
    for index, tensor in enumerate(originals):
        data = tensor.contiguous().view(torch.uint8).numpy().tobytes()
        code = {torch.float32: "F32", torch.bfloat16: "BF16"}[tensor.dtype]
        tensors.append(
            ManifestTensor(model="m", name=f"t{index}", dtype=code, shape=list(tensor.shape),
                           blob=BLOB, offset=offset, length=len(data))
        )
        blob += data
        offset += len(data)
    # Parameters that still require grad: the worker threads write them outside no_grad.
    destinations = {
        f"t{i}": torch.nn.Parameter(torch.full(t.shape, float("nan"), dtype=engine))
        for i, t in enumerate(originals)
    }
    segments, ranges = plan_param_stream(
        tensors, destinations, keys=[t.name for t in tensors], merge=merge
    )
    # small requests and slots: reads split inside tensors and span several of them
    sink = ParamSink(segments, device="cpu", slots=2, slot_size=64)
    try:
        stream(ranges, source=BytesSource({BLOB: blob}), sink=sink, request_size=64, workers=3)
    finally:
        sink.close()
    for index, tensor in enumerate(originals):
        assert torch.equal(destinations[f"t{index}"], tensor.to(engine)), index


def test_a_destination_that_does_not_fit_is_refused() -> None:
    tensor = ManifestTensor(model="m", name="w", dtype="F32", shape=[4, 4], blob=BLOB,
                            offset=0, length=64)
    for bad in (torch.zeros(4, 5), torch.zeros(16), torch.zeros(4, 8)[:, :4]):
        with pytest.raises(WeightMismatch) as caught:
            plan_param_stream([tensor], {"w": bad}, keys=["w"])
        assert caught.value.code in {"shape_mismatch", "not_contiguous"}


def test_a_chunk_that_fails_its_digest_never_reaches_the_parameters() -> None:
    # Two tensors, each exactly one digest chunk: on the CPU each would be read straight into
    # its parameter. The second chunk arrives corrupted: the load fails, and that parameter
    # still holds what it held, not one unverified byte (a capture replay then falls back).
    import xxhash

    from loader.errors import IntegrityError
    from loader.ranges import BlobDigests

    good = [torch.arange(16, dtype=torch.float32) + 100 * i for i in range(2)]
    data = b"".join(t.numpy().tobytes() for t in good)
    chunk = len(data) // 2
    digests = {BLOB: BlobDigests(len(data), chunk, tuple(
        xxhash.xxh3_128_hexdigest(data[i : i + chunk]) for i in (0, chunk)))}
    tensors = [ManifestTensor(model="m", name=f"t{i}", dtype="F32", shape=[16], blob=BLOB,
                              offset=i * chunk, length=chunk) for i in range(2)]
    destinations = {f"t{i}": torch.full((16,), -1.0) for i in range(2)}
    segments, ranges = plan_param_stream(tensors, destinations, keys=["t0", "t1"], merge=False)
    corrupted = bytearray(data)
    corrupted[-1] ^= 0xFF
    sink = ParamSink(segments, device="cpu", slots=2, slot_size=chunk)
    try:
        with pytest.raises(IntegrityError):
            stream(ranges, source=BytesSource({BLOB: bytes(corrupted)}), sink=sink,
                   digests=digests, workers=1)
    finally:
        sink.close()
    assert torch.equal(destinations["t0"], good[0])  # its chunk verified: delivered
    assert torch.equal(destinations["t1"], torch.full((16,), -1.0))
