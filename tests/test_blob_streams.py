"""Slow readers on the API port of a real ``weightcache serve``: bounded memory, bounded streams.

A hundred clients each ask for a 24 MiB blob (thirty of another tenant for a 16 MiB one), read
a few bytes and stall. The node holds a small piece per stream (not a chunk), admits at most
its per-tenant and per-node number of streams (the rest get 429/503 with ``Retry-After`` at
once), keeps answering everything else, and frees the slots when the readers go.
"""

from __future__ import annotations

import hashlib
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from tests.fixtures.serve_process import ServeProcess, register_local, serve_process
from tests.test_metrics import Scrape

MiB = 1024 * 1024
TOKENS = {"tok-a": "alpha", "tok-b": "beta"}
PER_TENANT = 60
PER_NODE = 80


def _slow_reader(node: ServeProcess, sha: str, token: str) -> tuple[socket.socket, bytes]:
    """A client that sends a GET, takes the first bytes of the answer, then stops reading."""
    port = int(node.url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # it takes almost nothing
    sock.settimeout(30)
    sock.connect(("127.0.0.1", port))
    request = (f"GET /v1/blobs/{sha} HTTP/1.1\r\nHost: node\r\n"
               f"Authorization: Bearer {token}\r\n\r\n")
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(1024)
        if not data:
            break
        head += data
    return sock, head


def _whole(sock: socket.socket, head: bytes) -> bytes:
    """The rest of a short (error) answer whose start is ``head``."""
    headers, _, body = head.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in headers.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(4096)
    return body


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _streams(node: ServeProcess) -> float:
    with node.client() as client:
        return Scrape(client.get("/metrics").text).get("weightcache_blob_streams")


def _readers(node: ServeProcess, sha: str, token: str, count: int) -> Iterator[
    tuple[socket.socket, bytes]
]:
    for _ in range(count):
        yield _slow_reader(node, sha, token)


def test_slow_readers_hold_little_memory_and_are_limited(tmp_path: Path) -> None:
    big, small = os.urandom(24 * MiB), os.urandom(16 * MiB)
    for name, data in (("a", big), ("b", small)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.txt").write_bytes(data)
    env = {
        "WEIGHTCACHE_LIMITS_BLOB_STREAMS": str(PER_NODE),
        "WEIGHTCACHE_LIMITS_BLOB_STREAMS_PER_TENANT": str(PER_TENANT),
    }
    with (
        serve_process(tmp_path, workers=1, tokens=TOKENS, env=env) as node,
        node.client("tok-a") as a,
        node.client("tok-b") as b,
    ):
        register_local(a, "p", tmp_path / "a")
        register_local(b, "p", tmp_path / "b")
        sha_a, sha_b = hashlib.sha256(big).hexdigest(), hashlib.sha256(small).hexdigest()
        assert a.get(f"/v1/blobs/{sha_a}").content == big  # chunks checked, code warm
        rss_before = node.rss_bytes()

        alpha = list(_readers(node, sha_a, "tok-a", 100))
        beta = list(_readers(node, sha_b, "tok-b", 30))
        try:
            statuses = [_status(head) for _, head in alpha]
            assert statuses.count(200) == PER_TENANT
            assert statuses.count(429) == 100 - PER_TENANT
            sock, head = alpha[statuses.index(429)]
            assert b"\r\nretry-after: 1\r\n" in head.lower()
            assert b'"code":"too_many_streams"' in _whole(sock, head)
            beta_statuses = [_status(head) for _, head in beta]
            assert beta_statuses.count(200) == PER_NODE - PER_TENANT
            assert beta_statuses.count(503) == 30 - (PER_NODE - PER_TENANT)
            assert _streams(node) == PER_NODE

            # Everything else is still answered while every stream slot is taken.
            assert a.get("/healthz", timeout=10).status_code == 200
            assert a.get("/v1/node", timeout=10).status_code == 200
            assert a.head(f"/v1/blobs/{sha_a}", timeout=10).status_code == 200
            assert a.get("/v1/pipelines/p", timeout=10).json()["state"] == "warm"

            time.sleep(1)  # let the buffers fill as far as they will
            grown = node.rss_bytes() - rss_before
            # 80 streams stalled: about two 256 KiB pieces each at most (unbounded, the
            # same 80 held 8 MiB pieces and 64 MiB chunks: over 1 GiB).
            assert grown < 96 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"
        finally:
            for sock, _ in alpha + beta:
                sock.close()

        deadline = time.monotonic() + 30
        while _streams(node) != 0:  # the slots come back as the readers leave
            assert time.monotonic() < deadline, "stream slots were not released"
            time.sleep(0.1)
        assert a.get(f"/v1/blobs/{sha_a}").content == big
        assert b.get(f"/v1/blobs/{sha_b}", headers={"Range": "bytes=5-9"}).content == (
            small[5:10]
        )
