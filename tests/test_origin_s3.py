"""The s3:// origin against a real SeaweedFS, with a counting proxy between them."""

from __future__ import annotations

import base64
import hashlib
import os
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from pydantic import SecretStr

from cache_node.errors import IntegrityError, OriginError, OriginNotFound, OriginUnauthorized
from cache_node.origins.base import OriginFile, Snapshot, SourceRef, parse_source
from cache_node.origins.s3 import PIECE_SIZE, S3Origin
from cache_node.settings import S3Settings
from tests.fixtures.counting_proxy import CountingProxy, Fault
from tests.fixtures.seaweed import SeaweedServer, free_ports

MakeOrigin = Callable[..., S3Origin]


def settings_for(
    endpoint_url: str, server: SeaweedServer, *, secret: str | None = None
) -> S3Settings:
    return S3Settings(
        endpoint_url=endpoint_url,
        access_key_id=server.access_key,
        secret_access_key=SecretStr(secret or server.secret_key),
        region="us-east-1",
    )


@pytest.fixture
async def open_origin(
    seaweed: SeaweedServer, proxy: CountingProxy
) -> AsyncIterator[MakeOrigin]:
    """Builds origins that talk to SeaweedFS through the proxy, and closes them afterwards."""
    made: list[S3Origin] = []

    def make(
        source: str, revision: str | None = None, include: list[str] | None = None
    ) -> S3Origin:
        origin = S3Origin(
            parse_source(source, revision),
            settings=settings_for(proxy.endpoint_url, seaweed),
            include=include,
        )
        made.append(origin)
        return origin

    yield make
    for origin in made:
        await origin.aclose()


async def read(origin: S3Origin, file: OriginFile, start: int, end: int) -> list[bytes]:
    return [chunk async for chunk in origin.read_range(file, start, end)]


async def read_into(
    origin: S3Origin, file: OriginFile, start: int, end: int, received: list[bytes]
) -> None:
    """Append each chunk to ``received`` as it comes, so a read that fails keeps its prefix."""
    async for chunk in origin.read_range(file, start, end):
        received.append(chunk)


def by_path(snapshot: Snapshot) -> dict[str, OriginFile]:
    return {f.path: f for f in snapshot.files}


def multipart_put(server: SeaweedServer, bucket: str, key: str, parts: list[bytes]) -> None:
    client = server.client
    upload = client.create_multipart_upload(Bucket=bucket, Key=key)
    done = []
    for number, data in enumerate(parts, start=1):
        part = client.upload_part(
            Bucket=bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number, Body=data
        )
        done.append({"PartNumber": number, "ETag": part["ETag"]})
    client.complete_multipart_upload(
        Bucket=bucket, Key=key, UploadId=upload["UploadId"], MultipartUpload={"Parts": done}
    )


@pytest.mark.anyio
async def test_resolve_lists_nested_files_with_their_digests(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    config = b'{"model_type": "llama"}'
    weights = os.urandom(100_000)
    big = [os.urandom(5 * 1024 * 1024), os.urandom(1000)]
    seaweed.put(bucket, "org/model/config.json", config)
    seaweed.put(bucket, "org/model/sub/model.safetensors", weights, sha256_checksum=True)
    multipart_put(seaweed, bucket, "org/model/sub/big.safetensors", big)
    seaweed.put(bucket, "org/model/pytorch_model.bin", b"duplicate weights")
    seaweed.put(bucket, "org/model/.cache/x.json", b"{}")
    seaweed.put(bucket, "org/model-2/other.safetensors", b"not under the prefix")

    origin = open_origin(f"s3://{bucket}/org/model")
    snapshot = await origin.resolve()

    files = by_path(snapshot)
    assert sorted(files) == ["config.json", "sub/big.safetensors", "sub/model.safetensors"]
    assert snapshot.source == f"s3://{bucket}/org/model/"
    assert snapshot.revision.startswith("etags:")
    assert len(snapshot.revision) == 6 + 32
    assert (await origin.resolve()).revision == snapshot.revision

    plain = files["config.json"]
    assert plain.size == len(config)
    assert plain.md5 == hashlib.md5(config).hexdigest()
    assert plain.etag == f'"{plain.md5}"'
    assert plain.sha256 is None

    checked = files["sub/model.safetensors"]
    assert checked.sha256 == hashlib.sha256(weights).hexdigest()
    assert checked.md5 == hashlib.md5(weights).hexdigest()

    multipart = files["sub/big.safetensors"]
    assert multipart.size == sum(len(p) for p in big)
    assert multipart.etag is not None
    assert "-" in multipart.etag
    assert multipart.md5 is None
    assert multipart.sha256 is None
    assert not multipart.has_digest


@pytest.mark.anyio
async def test_include_patterns_and_duplicate_formats(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    seaweed.put(bucket, "bin-only/pytorch_model.bin", b"weights")
    seaweed.put(bucket, "bin-only/config.json", b"{}")
    seaweed.put(bucket, "bin-only/notes.csv", b"a,b")

    default = await open_origin(f"s3://{bucket}/bin-only").resolve()
    assert sorted(by_path(default)) == ["config.json", "pytorch_model.bin"]

    only_json = await open_origin(f"s3://{bucket}/bin-only", include=["*.json"]).resolve()
    assert sorted(by_path(only_json)) == ["config.json"]
    assert only_json.revision != default.revision  # the revision pins what is fetched


@pytest.mark.anyio
async def test_sha256sums_manifest_supplies_digests(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    first, second, third = os.urandom(3000), os.urandom(4000), b"{}"
    seaweed.put(bucket, "m/a.safetensors", first)
    seaweed.put(bucket, "m/nested/b.safetensors", second)
    seaweed.put(bucket, "m/config.json", third)
    manifest = (
        f"# published with the weights\n"
        f"{hashlib.sha256(first).hexdigest()}  a.safetensors\n"
        f"{hashlib.sha256(second).hexdigest().upper()} *./nested/b.safetensors\n"
        f"{'0' * 64}  not-uploaded.safetensors\n"
    )
    seaweed.put(bucket, "m/SHA256SUMS", manifest.encode())

    snapshot = await open_origin(f"s3://{bucket}/m").resolve()
    files = by_path(snapshot)
    assert sorted(files) == ["a.safetensors", "config.json", "nested/b.safetensors"]
    assert files["a.safetensors"].sha256 == hashlib.sha256(first).hexdigest()
    assert files["nested/b.safetensors"].sha256 == hashlib.sha256(second).hexdigest()
    assert files["config.json"].sha256 is None

    # A different manifest is a different snapshot, even with the same weights.
    seaweed.put(bucket, "m/SHA256SUMS", manifest.replace("# published", "# re-published").encode())
    assert (await open_origin(f"s3://{bucket}/m").resolve()).revision != snapshot.revision


@pytest.mark.anyio
async def test_manifest_that_contradicts_the_checksum_is_an_integrity_error(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    data = os.urandom(2000)
    seaweed.put(bucket, "c/w.safetensors", data, sha256_checksum=True)
    seaweed.put(bucket, "c/SHA256SUMS", f"{'ab' * 32}  w.safetensors\n".encode())

    with pytest.raises(IntegrityError) as caught:
        await open_origin(f"s3://{bucket}/c").resolve()
    assert caught.value.details["actual"] == hashlib.sha256(data).hexdigest()


@pytest.mark.anyio
async def test_malformed_manifest_fails_resolve(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    seaweed.put(bucket, "bad/w.safetensors", b"x")
    seaweed.put(bucket, "bad/SHA256SUMS", b"not a digest  w.safetensors\n")

    with pytest.raises(OriginError, match="SHA256SUMS line 1") as caught:
        await open_origin(f"s3://{bucket}/bad").resolve()
    assert not caught.value.retryable


@pytest.mark.anyio
async def test_read_range_returns_exactly_the_asked_bytes(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin, proxy: CountingProxy
) -> None:
    data = os.urandom(2 * PIECE_SIZE + 12345)
    seaweed.put(bucket, "r/w.safetensors", data)
    origin = open_origin(f"s3://{bucket}/r")
    (file,) = (await origin.resolve()).files
    size = len(data)

    for start, end in [(0, 1), (size - 1, size), (1000, 3 * 1024 * 1024 + 7), (0, size)]:
        proxy.reset_counts()
        chunks = await read(origin, file, start, end)
        assert b"".join(chunks) == data[start:end]
        assert all(0 < len(chunk) <= PIECE_SIZE for chunk in chunks)
        assert proxy.gets(f"/{bucket}/r/w.safetensors") == 1
        assert proxy.bytes_sent(f"/{bucket}/r/w.safetensors") == end - start

    proxy.reset_counts()
    assert await read(origin, file, 10, 10) == []
    assert proxy.bytes_sent() == 0


@pytest.mark.anyio
async def test_an_object_replaced_after_resolve_fails_the_read(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    seaweed.put(bucket, "v/w.safetensors", b"version one")
    origin = open_origin(f"s3://{bucket}/v")
    (file,) = (await origin.resolve()).files
    seaweed.put(bucket, "v/w.safetensors", b"version two")

    with pytest.raises(OriginError, match="changed") as caught:
        await read(origin, file, 0, file.size)
    error = caught.value
    assert type(error) is OriginError
    assert error.code == "origin_error"
    assert error.status == 412
    assert not error.retryable


@pytest.mark.anyio
async def test_pinned_revision_must_still_match(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    seaweed.put(bucket, "p/w.safetensors", b"one")
    pinned = (await open_origin(f"s3://{bucket}/p").resolve()).revision
    # Built directly: parse_source does not accept ':' in revisions yet.
    ref = SourceRef("s3", f"{bucket}/p", pinned)
    origin = S3Origin(ref, settings=settings_for(seaweed.endpoint_url, seaweed))
    try:
        assert (await origin.resolve()).revision == pinned
        seaweed.put(bucket, "p/w.safetensors", b"two")
        with pytest.raises(OriginNotFound, match="changed") as caught:
            await origin.resolve()
    finally:
        await origin.aclose()
    assert caught.value.details["revision"] == pinned
    assert caught.value.details["current_revision"] != pinned


@pytest.mark.anyio
async def test_missing_bucket_prefix_and_object_are_not_found(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin
) -> None:
    with pytest.raises(OriginNotFound) as caught:
        await open_origin("s3://no-such-bucket-here/model").resolve()
    assert caught.value.status == 404
    assert not caught.value.retryable

    seaweed.put(bucket, "present/w.safetensors", b"bytes")
    with pytest.raises(OriginNotFound, match="no objects"):
        await open_origin(f"s3://{bucket}/absent").resolve()

    origin = open_origin(f"s3://{bucket}/present")
    (file,) = (await origin.resolve()).files
    seaweed.client.delete_object(Bucket=bucket, Key="present/w.safetensors")
    with pytest.raises(OriginNotFound):
        await read(origin, file, 0, file.size)


@pytest.mark.anyio
async def test_bad_credentials_are_unauthorized_and_never_echoed(
    seaweed: SeaweedServer, bucket: str
) -> None:
    seaweed.put(bucket, "s/w.safetensors", b"secret weights")
    wrong_secret = "wrong-" + uuid.uuid4().hex
    origin = S3Origin(
        parse_source(f"s3://{bucket}/s"),
        settings=settings_for(seaweed.endpoint_url, seaweed, secret=wrong_secret),
    )
    try:
        with pytest.raises(OriginUnauthorized) as caught:
            await origin.resolve()
    finally:
        await origin.aclose()
    error = caught.value
    assert error.code == "unauthorized"
    assert error.status == 403
    assert not error.retryable
    assert wrong_secret not in str(error.to_dict())
    assert seaweed.access_key in origin.scope
    assert wrong_secret not in origin.scope

    unknown_key = S3Origin(
        parse_source(f"s3://{bucket}/s"),
        settings=S3Settings(
            endpoint_url=seaweed.endpoint_url,
            access_key_id="nobody",
            secret_access_key=SecretStr("nothing"),
        ),
    )
    try:
        with pytest.raises(OriginUnauthorized):
            await unknown_key.resolve()
    finally:
        await unknown_key.aclose()


@pytest.mark.anyio
async def test_server_errors_are_retryable_with_retry_after(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin, proxy: CountingProxy
) -> None:
    seaweed.put(bucket, "e/w.safetensors", b"0123456789")
    origin = open_origin(f"s3://{bucket}/e")
    (file,) = (await origin.resolve()).files

    proxy.add_fault(Fault(match="e/w.safetensors", status=503, retry_after="7"))
    with pytest.raises(OriginError) as caught:
        await read(origin, file, 0, 10)
    assert caught.value.retryable
    assert caught.value.status == 503
    assert caught.value.retry_after == 7.0
    assert proxy.gets(f"/{bucket}/e/w.safetensors") == 1  # botocore itself does not retry

    proxy.add_fault(Fault(match="e/w.safetensors", status=429))
    with pytest.raises(OriginError) as caught:
        await read(origin, file, 0, 10)
    assert caught.value.retryable
    assert caught.value.retry_after is None

    proxy.add_fault(Fault(match=f"/{bucket}", status=500))  # the LIST
    with pytest.raises(OriginError) as caught:
        await origin.resolve()
    assert caught.value.retryable
    assert caught.value.status == 500

    assert b"".join(await read(origin, file, 0, 10)) == b"0123456789"  # faults are spent


@pytest.mark.anyio
async def test_a_reset_mid_body_is_retryable_and_never_overshoots(
    seaweed: SeaweedServer, bucket: str, open_origin: MakeOrigin, proxy: CountingProxy
) -> None:
    data = os.urandom(3 * PIECE_SIZE)
    seaweed.put(bucket, "x/w.safetensors", data)
    origin = open_origin(f"s3://{bucket}/x")
    (file,) = (await origin.resolve()).files

    proxy.add_fault(Fault(match="x/w.safetensors", reset_after=PIECE_SIZE + 100))
    received: list[bytes] = []
    with pytest.raises(OriginError) as caught:
        await read_into(origin, file, 0, file.size, received)
    assert caught.value.retryable
    got = b"".join(received)
    assert len(got) <= PIECE_SIZE + 100
    assert got == data[: len(got)]

    # Resuming where it stopped gives the rest.
    rest = b"".join(await read(origin, file, len(got), file.size))
    assert got + rest == data


@pytest.mark.anyio
async def test_unreachable_endpoint_is_retryable(seaweed: SeaweedServer) -> None:
    (closed_port,) = free_ports(1)
    origin = S3Origin(
        parse_source("s3://bucket/model"),
        settings=settings_for(f"http://127.0.0.1:{closed_port}", seaweed),
        connect_timeout_s=2,
    )
    try:
        with pytest.raises(OriginError) as caught:
            await origin.resolve()
    finally:
        await origin.aclose()
    assert type(caught.value) is OriginError
    assert caught.value.retryable
    assert seaweed.secret_key not in caught.value.message


def test_checksum_header_is_decoded_to_hex() -> None:
    from cache_node.origins.s3 import _full_object_sha256

    digest = hashlib.sha256(b"abc").digest()
    encoded = base64.b64encode(digest).decode()
    assert _full_object_sha256({"ChecksumSHA256": encoded}) == digest.hex()
    assert _full_object_sha256({"ChecksumSHA256": encoded, "ChecksumType": "COMPOSITE"}) is None
    assert _full_object_sha256({"ChecksumSHA256": encoded + "-3"}) is None
    assert _full_object_sha256({"ChecksumSHA256": "bm90IDMyIGJ5dGVz"}) is None
    assert _full_object_sha256({}) is None
