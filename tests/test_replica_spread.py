"""A replica's load from a region: ranges spread over the nodes holding each blob, failover.

The manifest of a region node lists, per blob, the nodes that hold it (``ManifestBlob.nodes``).
The loader spreads each blob's ranges over those nodes, and when one dies mid-load re-reads its
ranges from another holder without restarting the load. Here the nodes are a real
``weightcache serve`` (the node that answers the manifest) and loopback range servers over its
data dir (the same blobs, as the region's other holders); the manifest is the node's own with
``nodes`` filled in, as a region node fills it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import xxhash
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from api.schema import Manifest, ManifestBlob, ManifestTensor
from clients.load_cli import print_stage_table
from loader import load
from loader.errors import IntegrityError, SourceError
from loader.manifest_stream import load_manifest
from loader.sinks import staging_pool
from loader.sources import HttpRangeSource, blob_path
from tests.fixtures.blob_server import BlobServer
from tests.fixtures.node_server import free_port
from tests.fixtures.region_manifests import RegionManifests
from tests.fixtures.serve_process import ServeProcess, register_local, serve_process

ROOT = Path(__file__).parents[1]
MiB = 1 << 20
#: What the dying range server sends before it kills itself: more than one 4 MiB request.
DIES_AFTER = 6 * MiB


@pytest.fixture(autouse=True)
def _empty_pool() -> Iterator[None]:
    yield
    staging_pool.clear()


# ---------------------------------------------------------------------------------------------
# the wire field


def test_manifest_blob_nodes_is_additive() -> None:
    old = {"sha256": "ab" * 32, "size": 3, "chunk_size": 4, "chunk_xxh3_128": ["0" * 32]}
    assert ManifestBlob.model_validate(old).nodes == []
    blob = ManifestBlob.model_validate({**old, "nodes": ["http://n0:8471", "https://n1/p"]})
    assert blob.nodes == ["http://n0:8471", "https://n1/p"]
    for bad in ["n0:8471", "ftp://n0", "http://", "http://n0 /x"]:
        with pytest.raises(ValidationError):
            ManifestBlob.model_validate({**old, "nodes": [bad]})


# ---------------------------------------------------------------------------------------------
# the source, against loopback range servers


def _store(tmp_path: Path, count: int = 2) -> tuple[Path, Manifest, dict[str, torch.Tensor]]:
    """``count`` safetensors blobs in a node-like data dir, with 4 KiB digest chunks."""
    data_dir = tmp_path / "data"
    tensors: list[ManifestTensor] = []
    blobs: list[ManifestBlob] = []
    expected: dict[str, torch.Tensor] = {}
    generator = torch.Generator().manual_seed(3)
    for index in range(count):
        weights = {f"w{index}.{j}": torch.randn(64, 64, generator=generator) for j in range(4)}
        path = tmp_path / f"shard-{index}.safetensors"
        save_file(weights, str(path))
        payload = path.read_bytes()
        sha = hashlib.sha256(payload).hexdigest()
        blob_path(data_dir, sha).parent.mkdir(parents=True, exist_ok=True)
        blob_path(data_dir, sha).write_bytes(payload)
        chunks = [xxhash.xxh3_128_hexdigest(payload[i : i + 4096])
                  for i in range(0, len(payload), 4096)]
        blobs.append(ManifestBlob(sha256=sha, size=len(payload), chunk_size=4096,
                                  chunk_xxh3_128=chunks))
        header_len = int.from_bytes(payload[:8], "little")
        header = json.loads(payload[8 : 8 + header_len])
        for name, info in header.items():
            if name == "__metadata__":
                continue
            start, end = info["data_offsets"]
            tensors.append(ManifestTensor(
                model="m", name=name, dtype=info["dtype"], shape=info["shape"], blob=sha,
                offset=8 + header_len + start, length=end - start,
            ))
        expected.update(weights)
    manifest = Manifest(pipeline="p", tp_size=1, rank=0, files=[], tensors=tensors,
                        blobs=blobs, bytes_total=sum(t.length for t in tensors))
    return data_dir, manifest, expected


def _same(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _holders(manifest: Manifest, urls: Sequence[str]) -> dict[str, list[str]]:
    return {blob.sha256: list(urls) for blob in manifest.blobs}


def test_a_blobs_ranges_go_to_its_holders_before_the_answering_node(tmp_path: Path) -> None:
    data_dir, manifest, expected = _store(tmp_path)
    with BlobServer(data_dir) as own, BlobServer(data_dir) as one, BlobServer(data_dir) as two:
        source = HttpRangeSource([own.url], holders=_holders(manifest, [one.url, two.url]))
        tensors, report = load_manifest(manifest, source=source, request_size=4096, workers=4)
        _same(tensors, expected)
        assert own.state.requests == 0
        assert one.state.bytes_sent > 0
        assert two.state.bytes_sent > 0
        assert one.state.bytes_sent + two.state.bytes_sent == report.bytes_read
        assert source.bytes_by_node() == {one.url: one.state.bytes_sent,
                                          two.url: two.state.bytes_sent}
        assert source.failed_nodes() == {}
        assert source.failovers == 0


def test_a_blob_without_holders_is_read_from_the_answering_node(tmp_path: Path) -> None:
    data_dir, manifest, expected = _store(tmp_path)
    listed, unlisted = manifest.blobs
    with BlobServer(data_dir) as own, BlobServer(data_dir) as peer:
        source = HttpRangeSource([own.url], holders={listed.sha256: [peer.url]})
        tensors, report = load_manifest(manifest, source=source, request_size=4096)
    _same(tensors, expected)
    def tensor_bytes(sha: str) -> int:
        return sum(t.length for t in manifest.tensors if t.blob == sha)

    assert source.bytes_by_node() == {own.url: tensor_bytes(unlisted.sha256),
                                      peer.url: tensor_bytes(listed.sha256)}
    assert report.bytes_read == tensor_bytes(listed.sha256) + tensor_bytes(unlisted.sha256)


def test_a_holder_missing_a_blob_is_skipped_for_that_blob_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, manifest, expected = _store(tmp_path)
    stale = manifest.blobs[0].sha256  # the location hint says node one has it; it has not
    partial = tmp_path / "partial"
    for blob in manifest.blobs[1:]:
        blob_path(partial, blob.sha256).parent.mkdir(parents=True, exist_ok=True)
        blob_path(partial, blob.sha256).hardlink_to(blob_path(data_dir, blob.sha256))
    caplog.set_level(logging.WARNING, logger="weightcache.loader")
    with BlobServer(partial) as one, BlobServer(data_dir) as two:
        source = HttpRangeSource([two.url], holders=_holders(manifest, [one.url, two.url]))
        tensors, _ = load_manifest(manifest, source=source, request_size=4096, workers=4)
        _same(tensors, expected)
    served = source.bytes_by_node()
    assert served[one.url] > 0  # still in the rotation for the blob it has
    assert "404" in source.failed_nodes()[one.url]
    assert stale in source.failed_nodes()[one.url]
    assert source.failovers >= 1
    assert any(f"re-read from {two.url}" in r.getMessage() for r in caplog.records)


def _bad_copy(data_dir: Path, manifest: Manifest, dest: Path) -> str:
    """Every blob of ``data_dir`` in ``dest``, the first with one bit flipped in a tensor."""
    for blob in manifest.blobs:
        blob_path(dest, blob.sha256).parent.mkdir(parents=True, exist_ok=True)
        blob_path(dest, blob.sha256).write_bytes(blob_path(data_dir, blob.sha256).read_bytes())
    first = manifest.tensors[0]
    path = blob_path(dest, first.blob)
    data = bytearray(path.read_bytes())
    data[first.offset + first.length // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return first.blob


def test_a_holder_with_a_bad_copy_is_skipped_for_that_blob_and_its_chunks_re_read(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir, manifest, expected = _store(tmp_path)
    corrupted = _bad_copy(data_dir, manifest, tmp_path / "bad")
    caplog.set_level(logging.WARNING, logger="weightcache.loader")
    with BlobServer(tmp_path / "bad") as bad, BlobServer(data_dir) as good:
        # the bad copy's node is the holder, so every chunk is asked of it first
        source = HttpRangeSource([good.url], holders=_holders(manifest, [bad.url]))
        tensors, _ = load_manifest(manifest, source=source, verify=True, request_size=4096,
                                   workers=4)
        _same(tensors, expected)
    failure = source.failed_nodes()[bad.url]
    assert "hashes to" in failure
    assert corrupted in failure
    assert source.bytes_by_node()[bad.url] > 0  # still in the rotation for its good blob
    assert source.failovers >= 1
    assert any(f"re-read from {good.url}" in r.getMessage() for r in caplog.records)


def test_a_holder_that_goes_silent_costs_one_timeout_not_the_load(tmp_path: Path) -> None:
    # a host that died without closing its sockets: connections are accepted (the listen
    # backlog) and never answered
    data_dir, manifest, expected = _store(tmp_path)
    with socket.socket() as silent, BlobServer(data_dir) as good:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)
        silent_url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        source = HttpRangeSource([good.url], holders=_holders(manifest, [silent_url, good.url]),
                                 timeout=0.5)
        tensors, report = load_manifest(manifest, source=source, verify=True,
                                        request_size=4096, workers=4)
        _same(tensors, expected)
    assert "timed out" in source.failed_nodes()[silent_url]
    assert source.bytes_by_node() == {good.url: report.bytes_read}


def test_bad_bytes_from_every_holder_are_an_integrity_error(tmp_path: Path) -> None:
    data_dir, manifest, _ = _store(tmp_path)
    _bad_copy(data_dir, manifest, tmp_path / "bad")
    with BlobServer(tmp_path / "bad") as one, BlobServer(tmp_path / "bad") as two:
        source = HttpRangeSource([one.url], holders=_holders(manifest, [one.url, two.url]))
        with pytest.raises(IntegrityError, match="every cache node failed") as failed:
            load_manifest(manifest, source=source, verify=True, request_size=4096)
    assert failed.value.code == "integrity_error"
    assert set(source.failed_nodes()) == {one.url, two.url}


def test_every_holder_down_leaves_the_answering_node_then_its_api(tmp_path: Path) -> None:
    data_dir, manifest, expected = _store(tmp_path)
    dead = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]
    with BlobServer(data_dir) as own, BlobServer(data_dir) as api:
        source = HttpRangeSource([own.url], fallback_urls=[api.url],
                                 holders=_holders(manifest, dead))
        tensors, _ = load_manifest(manifest, source=source, request_size=4096, workers=4)
        _same(tensors, expected)
        assert api.state.requests == 0
        assert source.fallback_reads == 0
        assert set(source.failed_nodes()) == set(dead)

        own.state.fault = "down"
        source = HttpRangeSource([own.url], fallback_urls=[api.url],
                                 holders=_holders(manifest, dead))
        tensors, report = load_manifest(manifest, source=source, request_size=4096, workers=4)
        _same(tensors, expected)
        assert source.fallback_reads == report.requests
        assert set(source.failed_nodes()) == {*dead, own.url}


def test_every_node_gets_the_same_token(tmp_path: Path) -> None:
    data_dir, manifest, expected = _store(tmp_path)
    servers = [BlobServer(data_dir, token="tok-region") for _ in range(3)]
    with servers[0], servers[1], servers[2]:
        urls = [server.url for server in servers]
        source = HttpRangeSource(urls[:1], token="tok-region", holders=_holders(manifest, urls))
        tensors, _ = load_manifest(manifest, source=source, request_size=4096, workers=6,
                                   verify=True)
        _same(tensors, expected)
        assert source.failed_nodes() == {}
        assert all(server.state.bytes_sent > 0 for server in servers)

        source = HttpRangeSource(urls[:1], token="tok-other", holders=_holders(manifest, urls))
        with pytest.raises(SourceError, match="401"):
            load_manifest(manifest, source=source, request_size=4096)


# ---------------------------------------------------------------------------------------------
# a real node and its region: a few hundred MB, a node killed mid-load, eight replicas at once


def _write_model(directory: Path, *, tensors: int, tensor_bytes: int, seed: int) -> Path:
    directory.mkdir()
    generator = torch.Generator().manual_seed(seed)
    weights = {
        f"model.layers.{i}.mlp.weight": torch.randint(
            -(2**31), 2**31 - 1, (tensor_bytes // 4,), dtype=torch.int32, generator=generator
        )
        for i in range(tensors)
    }
    weights["model.norm.weight"] = torch.randn(4096, generator=generator).bfloat16()
    save_file(weights, str(directory / "model.safetensors"))
    (directory / "config.json").write_text('{"model_type": "unknown-arch"}')
    return directory / "model.safetensors"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """A real node holding ``big`` (about 300 MB: four 64 MiB digest chunks and a 32 MiB one,
    so that any verified read is longer than what the dying server sends) and ``small``."""
    tmp = tmp_path_factory.mktemp("region-load")
    _write_model(tmp / "big", tensors=18, tensor_bytes=16 * MiB, seed=1)
    _write_model(tmp / "small", tensors=8, tensor_bytes=4 * MiB, seed=2)
    with serve_process(tmp, workers=2) as running:
        with running.client() as client:
            register_local(client, "big", tmp / "big")
            register_local(client, "small", tmp / "small")
        yield running


def _expected(node: ServeProcess, model: str) -> dict[str, torch.Tensor]:
    return load_file(str(node.data_dir.parent / model / "model.safetensors"))


@pytest.fixture
def dying_server(node: ServeProcess) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A range server over the node's blobs, as a separate process that SIGKILLs itself once
    it has sent DIES_AFTER bytes: a holder dying while a load streams from it."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "fixtures" / "blob_server.py"),
         str(node.data_dir), "--port", str(port), "--processes", "1",
         "--die-after", str(DIES_AFTER)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/v1/blobs/{'0' * 64}", timeout=1).status_code == 404:
                    break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield process, url
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
        process.wait()


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "unverified"])
def test_a_node_killed_mid_load_leaves_the_load_whole(
    node: ServeProcess,
    dying_server: tuple[subprocess.Popen[bytes], str],
    verify: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    process, dying = dying_server
    caplog.set_level(logging.WARNING, logger="weightcache.loader")
    with BlobServer(node.data_dir) as other:
        holders = [dying, other.url, node.data_url]
        with httpx.Client(transport=RegionManifests(holders), timeout=30) as http:
            result = load("big", url=node.url, http=http, verify=verify,
                          request_size=4 * MiB, workers=8)
    assert process.wait(timeout=10) == -signal.SIGKILL  # it died, mid-load
    _same(result.tensors, _expected(node, "big"))
    report = result.report
    assert report.bytes > 250 * 10**6
    assert dying in report.failed_nodes
    assert report.failovers >= 1
    served = report.bytes_by_node
    assert sum(served.values()) == report.stream.bytes_read
    assert served.get(dying, 0) <= DIES_AFTER  # whole ranges only, never the one cut short
    assert served[other.url] > 0
    assert served[node.data_url] > 0
    assert report.as_dict()["failed_nodes"] == report.failed_nodes
    failovers = [r.getMessage() for r in caplog.records if "re-read from" in r.getMessage()]
    assert len(failovers) == report.failovers
    assert all(dying in message for message in failovers)


def test_eight_replicas_at_once_spread_over_three_nodes(node: ServeProcess) -> None:
    expected = _expected(node, "small")
    with BlobServer(node.data_dir) as a, BlobServer(node.data_dir) as b, \
            BlobServer(node.data_dir) as c:
        servers = {server.url: server for server in (a, b, c)}

        def replica(index: int) -> tuple[dict[str, int], int]:
            # Every replica gets the same list, in the same (rendezvous) order, as from a
            # region: spreading is the loader's own doing.
            with httpx.Client(transport=RegionManifests(list(servers)), timeout=30) as http:
                result = load("small", url=node.url, http=http, request_size=MiB, workers=4)
            _same(result.tensors, expected)
            return result.report.bytes_by_node, result.report.stream.bytes_read

        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(replica, range(8)))
        sent = {url: server.state.bytes_sent for url, server in servers.items()}
    total = sum(bytes_read for _, bytes_read in results)
    assert sum(sent.values()) == total  # nothing came from the answering node's data plane
    for by_node, bytes_read in results:
        assert set(by_node) == set(servers)  # each replica used every node
        assert sum(by_node.values()) == bytes_read
    for url, count in sent.items():
        assert count >= total / 6, (url, sent)  # at least half its fair share


def test_the_load_command_names_the_nodes(capsys: pytest.CaptureFixture[str]) -> None:
    report = {
        "pipeline": "p", "tp_size": 1, "rank": 0, "device": "cpu", "lease_s": 0.0,
        "manifest_s": 0.0, "connect_s": 0.0, "stream_s": 1.0, "verify_s": 0.0, "total_s": 1.0,
        "bytes_delivered": 3 * 10**9, "gb_per_s": 3.0, "fallback_reads": 0,
        "fallback_reason": None, "failovers": 2,
        "bytes_by_node": {"http://n0:8471": 2 * 10**9, "http://n1:8471": 10**9},
        "failed_nodes": {"http://n2:8471": "[Errno 111] Connection refused"},
    }
    print_stage_table(report)
    out = capsys.readouterr().out
    assert "from http://n0:8471  2.000 GB" in out
    assert "failed: http://n2:8471 ([Errno 111] Connection refused)" in out
    assert "2 reads were re-read from another node" in out
