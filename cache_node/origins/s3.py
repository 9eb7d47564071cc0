"""The ``s3://BUCKET/PREFIX`` origin: list, pin each object by ETag, read with ranged GETs.

Resolve lists the prefix (a folder: ``s3://b/models/llama`` means the keys under
``models/llama/``), selects files with the include patterns, and asks each selected object for
its checksum with a HEAD. Digests come from, in order of trust: a full-object ``ChecksumSHA256``,
a ``SHA256SUMS`` manifest beside the files, and a single-part ETag (an MD5, unless the object is
KMS- or customer-key encrypted, where the ETag is not an MD5).

Plain S3 keeps only the current version of a key, so the revision is a digest of the selected
keys and their ETags (plus the manifest's): ``etags:<32 hex>``. A pinned revision that no longer
matches cannot be served by the origin any more, so it raises ``OriginNotFound``, the error an
unknown Hugging Face revision raises too. Every ranged GET carries ``If-Match: <etag>``, so an
object replaced after resolve fails the read (412, not retryable) instead of mixing versions (I9).

Retries belong to the fetcher: botocore is told to make one attempt, and every foreign error is
translated into ``OriginError`` (``retryable`` set, ``Retry-After`` honoured) at this boundary.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hashlib
import re
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
from aiobotocore.config import AioConfig
from aiobotocore.session import AioSession, get_session
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    NoCredentialsError,
    ParamValidationError,
    PartialCredentialsError,
    ProfileNotFound,
)

from cache_node.errors import (
    IntegrityError,
    InvalidInput,
    OriginError,
    OriginNotFound,
    OriginUnauthorized,
)
from cache_node.origins.base import OriginFile, Snapshot, SourceRef, safe_relative_path
from cache_node.origins.manifest import MANIFEST_NAME, parse_sha256sums
from cache_node.origins.patterns import select_files
from cache_node.origins.retry_after import parse_retry_after
from cache_node.settings import S3Settings
from loader.content_range import parse_content_range

#: Bytes handed to the fetcher per piece: large enough that per-piece costs (hash update,
#: a disk write in a thread) vanish, small enough to keep memory flat across many streams.
PIECE_SIZE = 2 * 1024 * 1024
_MANIFEST_MAX_BYTES = 16 * 1024 * 1024
_HEAD_CONCURRENCY = 16
_SINGLE_PART_ETAG = re.compile(r"[0-9a-fA-F]{32}")
_NOT_MD5_ENCRYPTION = frozenset({"aws:kms", "aws:kms:dsse"})
_UNAUTHORIZED_CODES = frozenset(
    {
        "AccessDenied",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchBucket", "NoSuchKey", "NotFound"})
_RETRYABLE_CODES = frozenset(
    {"InternalError", "RequestTimeout", "ServiceUnavailable", "SlowDown", "Throttling"}
)
#: What the network and the HTTP stack raise under botocore; everything else is a bug.
_FOREIGN_ERRORS = (ClientError, BotoCoreError, aiohttp.ClientError, TimeoutError, OSError)


class S3Origin:
    """An S3 (or S3-compatible) prefix as an :class:`~cache_node.origins.base.Origin`."""

    def __init__(
        self,
        ref: SourceRef,
        *,
        settings: S3Settings,
        include: Sequence[str] | None = None,
        max_pool_connections: int = 64,
        connect_timeout_s: float = 10.0,
        read_timeout_s: float = 60.0,
    ) -> None:
        if ref.scheme != "s3":
            raise InvalidInput(f"not an s3:// source: {ref.scheme}://{ref.location}")
        bucket, _, prefix = ref.location.partition("/")
        self._ref = ref
        self._bucket = bucket
        # A prefix names a folder: without the slash, "models/llama" would also list
        # "models/llama-2/...".
        self._prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        self._settings = settings
        self._include = tuple(include) if include else None
        self._max_pool_connections = max_pool_connections
        self._connect_timeout_s = connect_timeout_s
        self._read_timeout_s = read_timeout_s
        self.source = f"s3://{bucket}/{self._prefix}"
        endpoint = settings.endpoint_url or "aws"
        # The key id is an identifier, not a secret; the digest tells apart secrets, session
        # tokens and profiles of one key id.
        self.scope = (
            f"s3:{endpoint}:{settings.access_key_id or 'default-credentials'}:"
            f"{_credential_digest(settings)}"
        )
        self._stack = AsyncExitStack()
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    async def resolve(self) -> Snapshot:
        """List the prefix, pin every selected object by ETag, and gather their digests."""
        listing: dict[str, Mapping[str, Any]] = {}
        for obj in await self._list_objects():
            relative = str(obj["Key"])[len(self._prefix) :]
            if relative and not relative.endswith("/"):  # "folder/" keys are placeholders
                listing[relative] = obj
        if not listing:
            raise OriginNotFound(f"no objects under {self.source}", source=self.source)
        manifest_object = listing.pop(MANIFEST_NAME, None)
        manifest = await self._read_manifest(manifest_object) if manifest_object else {}
        selected = [safe_relative_path(p) for p in select_files(list(listing), self._include)]

        limit = asyncio.Semaphore(_HEAD_CONCURRENCY)

        async def describe(path: str) -> OriginFile:
            async with limit:
                return await self._describe(path, listing[path], manifest.get(path))

        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(describe(path)) for path in selected]
        except ExceptionGroup as failures:
            raise failures.exceptions[0] from None
        files = tuple(task.result() for task in tasks)

        pins = [(f.path, f.etag or "") for f in files]
        if manifest_object is not None:
            pins.append((MANIFEST_NAME, str(manifest_object["ETag"])))
        revision = _listing_revision(pins)
        if self._ref.revision is not None and self._ref.revision != revision:
            raise OriginNotFound(
                f"{self.source} no longer has revision {self._ref.revision}: its objects "
                f"changed (now {revision}), and S3 serves only the current versions",
                source=self.source,
                revision=self._ref.revision,
                current_revision=revision,
            )
        return Snapshot(source=self.source, revision=revision, files=files)

    async def read_range(self, file: OriginFile, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield bytes ``[start, end)`` of ``file``'s pinned version, in chunks of about 2 MiB."""
        if not 0 <= start <= end <= file.size:
            raise InvalidInput(f"range [{start}, {end}) outside {file.path} ({file.size} bytes)")
        if start == end:
            return
        key = self._prefix + file.path
        request: dict[str, Any] = {
            "Bucket": self._bucket,
            "Key": key,
            "Range": f"bytes={start}-{end - 1}",
        }
        if file.etag:
            request["IfMatch"] = file.etag
        client = await self._get_client()
        try:
            response = await client.get_object(**request)
        except _FOREIGN_ERRORS as exc:
            raise _translate(exc, action="GET", target=self._url(key)) from exc
        body = response["Body"]
        try:
            skip = _body_offset(response, start, target=self._url(key))
            remaining = end - start
            pieces: list[bytes] = []
            buffered = 0
            while remaining > 0:
                piece = await body.read(min(skip or remaining, PIECE_SIZE - buffered))
                if not piece:
                    break  # a short body: the fetcher resumes from what it got
                if skip:  # the origin ignored Range and sent the whole object
                    skip -= len(piece)
                    continue
                pieces.append(piece)
                buffered += len(piece)
                remaining -= len(piece)
                if buffered >= PIECE_SIZE:
                    yield b"".join(pieces)
                    pieces.clear()
                    buffered = 0
            if pieces:
                yield b"".join(pieces)
        except _FOREIGN_ERRORS as exc:
            raise _translate(exc, action="GET", target=self._url(key)) from exc
        finally:
            body.close()

    def pin(self, snapshot: Snapshot) -> None:
        """Nothing to adopt: every file of a snapshot carries the ETag its reads are pinned to."""

    async def aclose(self) -> None:
        """Close the client and its connection pool."""
        await self._stack.aclose()
        self._client = None

    async def _get_client(self) -> Any:
        # Created on first use, inside a running loop, because aiohttp binds to it.
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    try:
                        self._client = await self._stack.enter_async_context(
                            self._create_client()
                        )
                    except _FOREIGN_ERRORS as exc:
                        raise _translate(exc, action="connect", target=self.source) from exc
        return self._client

    def _create_client(self) -> Any:
        settings = self._settings
        config = AioConfig(
            max_pool_connections=self._max_pool_connections,
            connect_timeout=self._connect_timeout_s,
            read_timeout=self._read_timeout_s,
            # The fetcher retries with backoff and a budget; botocore retrying too would
            # multiply attempts and hide Retry-After.
            retries={"total_max_attempts": 1, "mode": "standard"},
            # S3-compatible servers (SeaweedFS, MinIO) serve buckets by path, not by host name.
            s3={"addressing_style": "path"} if settings.endpoint_url else {},
            # The fetcher hashes every byte with sha256; a second CRC pass buys nothing.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            tcp_keepalive=True,
        )
        credentials: dict[str, str | None] = {}
        if settings.access_key_id:
            credentials = {
                "aws_access_key_id": settings.access_key_id,
                "aws_secret_access_key": _secret(settings.secret_access_key),
                "aws_session_token": _secret(settings.session_token),
            }
        # Without explicit keys botocore's default chain applies (profiles, instance roles).
        return _session(None if credentials else settings.profile).create_client(
            "s3",
            region_name=settings.region,
            endpoint_url=settings.endpoint_url,
            config=config,
            **credentials,
        )

    async def _list_objects(self) -> list[Mapping[str, Any]]:
        client = await self._get_client()
        objects: list[Mapping[str, Any]] = []
        try:
            paginator = client.get_paginator("list_objects_v2")
            async for page in paginator.paginate(Bucket=self._bucket, Prefix=self._prefix):
                objects.extend(page.get("Contents", ()))
        except _FOREIGN_ERRORS as exc:
            raise _translate(exc, action="LIST", target=self.source) from exc
        return objects

    async def _read_manifest(self, obj: Mapping[str, Any]) -> dict[str, str]:
        key = self._prefix + MANIFEST_NAME
        if int(obj["Size"]) > _MANIFEST_MAX_BYTES:
            raise OriginError(
                f"{self._url(key)} is larger than {_MANIFEST_MAX_BYTES} bytes", retryable=False
            )
        client = await self._get_client()
        try:
            response = await client.get_object(
                Bucket=self._bucket, Key=key, IfMatch=str(obj["ETag"])
            )
            async with response["Body"] as body:
                data: bytes = await body.read()
        except _FOREIGN_ERRORS as exc:
            raise _translate(exc, action="GET", target=self._url(key)) from exc
        try:
            return parse_sha256sums(data.decode("utf-8"))
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            raise OriginError(f"{self._url(key)}: {exc}", retryable=False) from exc

    async def _describe(
        self, path: str, listed: Mapping[str, Any], manifest_sha256: str | None
    ) -> OriginFile:
        key = self._prefix + path
        etag = str(listed["ETag"])
        client = await self._get_client()
        try:
            head = await client.head_object(
                Bucket=self._bucket, Key=key, IfMatch=etag, ChecksumMode="ENABLED"
            )
        except _FOREIGN_ERRORS as exc:
            error = _translate(exc, action="HEAD", target=self._url(key))
            if error.status == 412:  # replaced between LIST and HEAD: resolving again works
                error.retryable = True
            raise error from exc
        checksum_sha256 = _full_object_sha256(head)
        if manifest_sha256 and checksum_sha256 and manifest_sha256 != checksum_sha256:
            raise IntegrityError(
                f"{self._url(self._prefix + MANIFEST_NAME)} says {path} has sha256 "
                f"{manifest_sha256}, but the object's checksum is {checksum_sha256}",
                path=path,
                expected=manifest_sha256,
                actual=checksum_sha256,
            )
        encryption = head.get("ServerSideEncryption")
        plain_md5 = (
            _SINGLE_PART_ETAG.fullmatch(etag.strip('"'))
            and encryption not in _NOT_MD5_ENCRYPTION
            and not head.get("SSECustomerAlgorithm")
        )
        return OriginFile(
            path=path,
            size=int(listed["Size"]),
            sha256=checksum_sha256 or manifest_sha256,
            md5=etag.strip('"').lower() if plain_md5 else None,
            etag=etag,
        )

    def _url(self, key: str) -> str:
        return f"s3://{self._bucket}/{key}"


@functools.cache
def _session(profile: str | None = None) -> Any:
    # One per process (and profile): a session loads the S3 service model (~0.4 s) once for
    # all its clients.
    if profile is None:
        return get_session()
    return AioSession(profile=profile)


def _credential_digest(settings: S3Settings) -> str:
    """Names the credentials a client uses, so single flight and the verified-object facts
    never cross them (I4), without letting a secret be recovered from the scope."""
    if not settings.access_key_id and not settings.profile:
        return "-"
    material = "\0".join(
        [
            settings.access_key_id or "",
            _secret(settings.secret_access_key) or "",
            _secret(settings.session_token) or "",
            settings.profile or "",
        ]
    )
    return hashlib.sha256(b"weightcache-s3-scope\0" + material.encode()).hexdigest()[:16]


def _secret(value: Any) -> str | None:
    return None if value is None else str(value.get_secret_value())


def _listing_revision(pins: Sequence[tuple[str, str]]) -> str:
    digest = hashlib.sha256()
    for path, etag in sorted(pins):
        digest.update(f"{path}\0{etag}\n".encode())
    return "etags:" + digest.hexdigest()[:32]


def _full_object_sha256(head: Mapping[str, Any]) -> str | None:
    """The hex sha256 of the whole object, if the server declared one.

    A multipart upload's ``COMPOSITE`` checksum (``<b64>-<parts>``) hashes the part checksums,
    not the bytes, so it is no digest of the object.
    """
    value = head.get("ChecksumSHA256")
    if not value or head.get("ChecksumType") == "COMPOSITE" or "-" in str(value):
        return None
    try:
        raw = base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


def _body_offset(response: Mapping[str, Any], start: int, *, target: str) -> int:
    """How many leading body bytes to drop so the body starts at ``start``."""
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    content_range = str(response.get("ContentRange") or "")
    if status == 200 and not content_range:
        return start  # the whole object
    served = parse_content_range(content_range)
    if served is None or served.first != start:
        raise OriginError(
            f"GET {target}: asked for bytes from {start}, got Content-Range "
            f"{content_range or 'missing'!r} (HTTP {status})",
            status=status,
        )
    return 0


def _translate(exc: BaseException, *, action: str, target: str) -> OriginError:
    """The weightcache error for a botocore/aiohttp failure; never includes credentials."""
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code") or "")
        metadata = exc.response.get("ResponseMetadata", {})
        status = metadata.get("HTTPStatusCode")
        status = int(status) if status is not None else None
        message = f"{action} {target}: HTTP {status} {code}: {error.get('Message') or code}"
        if status in (401, 403) or code in _UNAUTHORIZED_CODES:
            return OriginUnauthorized(message, status=status)
        if status == 404 or code in _NOT_FOUND_CODES:
            return OriginNotFound(message, status=status)
        if status == 412 or code == "PreconditionFailed":
            return OriginError(
                f"{action} {target}: the object changed since the snapshot was resolved "
                "(its ETag no longer matches); resolve the source again",
                status=status,
                retryable=False,
            )
        retryable = status is None or status == 429 or status >= 500 or code in _RETRYABLE_CODES
        return OriginError(
            message,
            status=status,
            retryable=retryable,
            retry_after=_retry_after(metadata.get("HTTPHeaders", {})),
        )
    if isinstance(exc, NoCredentialsError | PartialCredentialsError):
        return OriginUnauthorized(f"{action} {target}: no usable S3 credentials ({exc})")
    if isinstance(exc, ProfileNotFound):  # a tenant's (or the node's) profile is not set up
        return OriginUnauthorized(f"{action} {target}: {exc}")
    if isinstance(exc, ParamValidationError):
        return OriginError(f"{action} {target}: {exc}", retryable=False)
    reason = str(exc) or type(exc).__name__
    return OriginError(f"{action} {target}: {reason}", retryable=True)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    value = next((v for k, v in headers.items() if k.lower() == "retry-after"), None)
    return parse_retry_after(value)