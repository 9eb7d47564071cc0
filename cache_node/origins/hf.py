"""``hf://`` sources: a Hugging Face Hub repo (or a compatible mirror) pinned to a commit.

``resolve`` asks the hub, through ``huggingface_hub``, for the commit a revision points at and
the file tree of that commit; every later byte is read from ``resolve/<commit sha>/...``, so a
branch that moves mid-fill never mixes two commits into one snapshot (I9).

``read_range`` speaks plain HTTP with ``httpx``: the hub redirects LFS files to a CDN on another
host, and the token must not follow it there, so redirects are followed by hand. Servers that
misbehave (200 instead of 206, a range that starts elsewhere, gzip on a range) get bytes checked
and trimmed to the asked range, or a clean ``OriginError``; never a byte outside the range. An
object that is not the listed file at all (an HTML error page, a Git LFS pointer, another size)
is an ``IntegrityError`` naming the expected and the actual digest or size, with no retry.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypeVar
from urllib.parse import quote

import anyio.to_thread
import httpx
from huggingface_hub import HfApi
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from cache_node.errors import IntegrityError, OriginError, OriginNotFound, OriginUnauthorized
from cache_node.origins.base import OriginFile, Snapshot, SourceRef, safe_relative_path
from cache_node.origins.patterns import select_files
from cache_node.origins.retry_after import parse_retry_after
from cache_node.settings import HFSettings
from loader.content_range import parse_content_range, parse_unsatisfied_range

__all__ = ["HFOrigin", "parse_retry_after"]

DEFAULT_REVISION = "main"
MAX_REDIRECTS = 5
#: Bytes read from a response body at a time (not the store's digest chunk).
PIECE_SIZE = 1024 * 1024
_SMALL_BODY = 64 * 1024  # a wrong body up to this size is read whole to name its digest
_COMMIT_SHA = re.compile(r"[0-9a-f]{40}")
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_RETRYABLE_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_T = TypeVar("_T")


class HFOrigin:
    """A Hugging Face repo as an origin (the ``Origin`` protocol of ``origins.base``).

    One instance serves one snapshot: ``read_range`` reads at the commit the last ``resolve``
    pinned. ``http`` lets the caller share a client or set its timeouts; redirects are always
    followed here, whatever the client's own setting.
    """

    def __init__(
        self,
        ref: SourceRef,
        *,
        settings: HFSettings,
        include: Sequence[str] | None = None,
        http: httpx.AsyncClient | None = None,
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.ref = ref
        self.repo_id = ref.location
        self.include = include
        self.endpoint = (settings.endpoint or "https://huggingface.co").rstrip("/")
        self._token = settings.token.get_secret_value() if settings.token else None
        self.scope = f"{self.endpoint}#{_token_digest(self._token)}"
        # token=False: the settings are the only source of credentials, never ~/.cache.
        self._api = HfApi(
            endpoint=self.endpoint, token=self._token or False, library_name="weightcache"
        )
        self._owns_http = http is None
        self._http = http or httpx.AsyncClient(
            follow_redirects=False, timeout=httpx.Timeout(60.0, connect=connect_timeout_s)
        )
        self._commit: str | None = None

    # -- resolve ---------------------------------------------------------------------------

    async def resolve(self) -> Snapshot:
        """Pin the revision (default ``main``) to its commit sha and list the selected files."""
        revision = self.ref.revision or DEFAULT_REVISION
        info = await self._hub_call(self._api.model_info, self.repo_id, revision=revision)
        commit = getattr(info, "sha", None)
        if not commit:
            commit = await self._commit_from_mirror(revision)
        elif _COMMIT_SHA.fullmatch(revision) and commit != revision:
            raise OriginError(
                f"{self.endpoint} answered commit {commit} for {self.repo_id}@{revision}: "
                "it does not honour pinned revisions",
                retryable=False,
            )
        entries = await self._hub_call(self._list_tree, commit)
        by_path = {e.path: e for e in entries if getattr(e, "size", None) is not None}
        files = []
        for path in select_files(list(by_path), self.include):
            entry = by_path[safe_relative_path(path)]
            lfs = getattr(entry, "lfs", None)
            sha256 = getattr(lfs, "sha256", None) if lfs is not None else None
            # For an LFS file the blob id is the pointer file's, not the content's: unusable.
            git_sha1 = getattr(entry, "blob_id", None) if lfs is None else None
            files.append(
                OriginFile(path=path, size=int(entry.size), sha256=sha256, git_sha1=git_sha1)
            )
        self._commit = commit
        snapshot = Snapshot(source=f"hf://{self.repo_id}", revision=commit, files=tuple(files))
        if getattr(info, "gated", False) and files:
            # Gated repos show their tree to anyone but serve files only to approved tokens:
            # one HEAD finds out now, before the fetcher reserves space for nothing.
            await self._probe_access(files[0])
        return snapshot

    def _list_tree(self, commit: str) -> list[Any]:
        return list(
            self._api.list_repo_tree(self.repo_id, revision=commit, recursive=True, expand=False)
        )

    async def _commit_from_mirror(self, revision: str) -> str:
        """The commit for a hub that leaves ``sha`` out of model info: from ``X-Repo-Commit``."""
        entries = await self._hub_call(self._list_tree, revision)
        first = next((e for e in entries if getattr(e, "size", None) is not None), None)
        if first is not None:
            url = self._file_url(first.path, revision)
            try:
                async with self._open(url, method="HEAD") as resp:
                    commit = str(resp.headers.get("X-Repo-Commit", ""))
            except httpx.HTTPError as exc:
                raise self._unreachable(exc) from None
            if _COMMIT_SHA.fullmatch(commit):
                return commit
        if _COMMIT_SHA.fullmatch(revision):
            return revision  # already immutable
        raise OriginError(
            f"{self.endpoint} did not say which commit {self.repo_id}@{revision} is; "
            "give the commit sha as the revision",
            retryable=False,
        )

    async def _probe_access(self, file: OriginFile) -> None:
        assert self._commit is not None
        try:
            async with self._open(self._file_url(file.path, self._commit), method="HEAD") as resp:
                self._raise_for_status(resp, file)
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from None

    async def _hub_call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run a blocking ``huggingface_hub`` call in a thread, translating its errors."""
        try:
            return await anyio.to_thread.run_sync(lambda: fn(*args, **kwargs))
        except HfHubHTTPError as exc:
            raise self._hub_error(exc) from None
        except _HUB_TRANSPORT_ERRORS as exc:  # connection refused, DNS, timeouts
            raise self._unreachable(exc) from None

    def _unreachable(self, exc: Exception) -> OriginError:
        # The exception's own text may carry a signed URL: only its type is reported.
        return OriginError(f"cannot reach {self.endpoint}: {type(exc).__name__}", retryable=True)

    def _hub_error(self, exc: HfHubHTTPError) -> OriginError:
        status = exc.response.status_code if exc.response is not None else None
        where = f"{self.repo_id}@{self.ref.revision or DEFAULT_REVISION}"
        if isinstance(exc, GatedRepoError):
            return OriginUnauthorized(f"{where} is gated and {self._credentials}", status=status)
        if isinstance(exc, RepositoryNotFoundError) and status == 401:
            # The hub answers 401 for private and gated repos without a usable token.
            return OriginUnauthorized(
                f"{where}: no such repo, or it is private and {self._credentials}", status=status
            )
        if isinstance(exc, (RepositoryNotFoundError, RevisionNotFoundError)) or status == 404:
            return OriginNotFound(f"{where} not found on {self.endpoint}", status=status)
        if status in (401, 403):
            return OriginUnauthorized(f"{where}: access denied, {self._credentials}", status=status)
        retry_after = None
        if exc.response is not None:
            retry_after = parse_retry_after(exc.response.headers.get("Retry-After"))
        return OriginError(
            f"{self.endpoint} answered {status} for {where}",
            status=status,
            retryable=status is None or status in _RETRYABLE_STATUS,
            retry_after=retry_after,
        )

    @property
    def _credentials(self) -> str:
        return "the node's token lacks access" if self._token else "the node has no HF token"

    # -- read ------------------------------------------------------------------------------

    async def read_range(self, file: OriginFile, start: int, end: int) -> AsyncIterator[bytes]:
        """Yield the bytes ``[start, end)`` of ``file`` at the pinned commit."""
        if not 0 <= start <= end:
            raise ValueError(f"bad range [{start}, {end}) for {file.path}")
        if start == end:
            return
        if self._commit is None:
            raise RuntimeError("resolve() before read_range()")
        headers = {"Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        url = self._file_url(file.path, self._commit)
        try:
            async with self._open(url, headers=headers) as response:
                if response.status_code == 416:
                    served = parse_unsatisfied_range(response.headers.get("Content-Range"))
                    if served is not None and served != file.size:
                        raise await _not_the_file(response, file, served_size=served, whole=False)
                self._raise_for_status(response, file, start=start)
                if response.status_code == 416:
                    return  # start == size: nothing left to read (checked by _raise_for_status)
                async for chunk in self._body(response, file, start, end):
                    yield chunk
        except httpx.HTTPError as exc:
            raise OriginError(
                f"reading {file.path} from {self.endpoint} failed: {type(exc).__name__}",
                retryable=True,
            ) from None

    async def _body(
        self, response: httpx.Response, file: OriginFile, start: int, end: int
    ) -> AsyncIterator[bytes]:
        """The part of the body inside ``[start, end)``, whatever shape the server sent."""
        encoding = response.headers.get("Content-Encoding", "identity").strip().lower()
        if response.status_code == 206:
            if encoding != "identity":
                raise OriginError(
                    f"{file.path}: the origin compressed a range ({encoding}) though asked for "
                    "identity",
                    status=206,
                    retryable=True,
                )
            position = await self._range_start(response, file, start, end)
            chunks = response.aiter_raw(PIECE_SIZE)
        else:  # 200: the whole file from byte 0
            position = 0
            if encoding == "identity":
                length = _int_or_none(response.headers.get("Content-Length"))
                if length is not None and length != file.size:
                    raise await _not_the_file(response, file, served_size=length, whole=True)
                chunks = response.aiter_raw(PIECE_SIZE)
            else:
                chunks = response.aiter_bytes(PIECE_SIZE)  # httpx decodes gzip and deflate
        async for chunk in chunks:
            chunk_end = position + len(chunk)
            if chunk_end > start:
                yield chunk[max(0, start - position) : min(len(chunk), end - position)]
            position = chunk_end
            if position >= end:
                return

    async def _range_start(
        self, response: httpx.Response, file: OriginFile, start: int, end: int
    ) -> int:
        """Where a 206 body starts in the file; raises when it cannot be trusted."""
        content_range = response.headers.get("Content-Range")
        if content_range is None:
            # Without Content-Range, only a body of exactly the asked length is the asked range.
            if _int_or_none(response.headers.get("Content-Length")) == end - start:
                return start
            raise OriginError(f"{file.path}: 206 without Content-Range", status=206, retryable=True)
        served = parse_content_range(content_range)
        if served is None:
            raise OriginError(
                f"{file.path}: unreadable Content-Range {content_range!r}", status=206
            )
        first, last = served.first, served.last
        if served.size is not None and served.size != file.size:
            whole = first == 0 and last + 1 == served.size
            raise await _not_the_file(response, file, served_size=served.size, whole=whole)
        if first > start or last < first:
            raise OriginError(
                f"{file.path}: asked for bytes from {start}, the origin sent {first}-{last}",
                status=206,
                retryable=True,
            )
        return first  # at or before start: the bytes before it are skipped

    def _raise_for_status(
        self, response: httpx.Response, file: OriginFile, *, start: int | None = None
    ) -> None:
        status = response.status_code
        served = response.headers.get("X-Repo-Commit")
        if served and self._commit and served != self._commit:
            raise OriginError(
                f"{file.path}: the origin served commit {served} for pinned commit {self._commit}",
                status=status,
                retryable=False,
            )
        if status in (200, 206) or (status in _REDIRECTS and start is None):
            return
        if status == 416 and start is not None and start >= file.size:
            return
        gated = response.headers.get("X-Error-Code") == "GatedRepo"
        what = f"{self.repo_id}/{file.path}"
        if status in (401, 403):
            kind = "is gated and" if gated else "is private or"
            raise OriginUnauthorized(f"{what} {kind} {self._credentials}", status=status)
        if status == 404:
            raise OriginNotFound(f"{what} not found at commit {self._commit}", status=status)
        retryable = status in _RETRYABLE_STATUS
        raise OriginError(
            f"{self.endpoint} answered {status} for {what}",
            status=status,
            retryable=retryable,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
        )

    @asynccontextmanager
    async def _open(
        self, url: str, *, method: str = "GET", headers: dict[str, str] | None = None
    ) -> AsyncIterator[httpx.Response]:
        """Send a request, following up to ``MAX_REDIRECTS`` redirects by hand.

        ``Authorization`` goes only to the endpoint's own scheme, host and port; once a redirect
        leaves them the token stays behind for the rest of the chain, so a CDN (or anyone it
        redirects to) never sees it.
        """
        request_headers = dict(headers or {})
        if self._token:
            request_headers["Authorization"] = f"Bearer {self._token}"
        target = httpx.URL(url)
        home = _origin_of(httpx.URL(self.endpoint))
        for _ in range(MAX_REDIRECTS + 1):
            if _origin_of(target) != home:
                request_headers.pop("Authorization", None)
            request = self._http.build_request(method, target, headers=request_headers)
            response = await self._http.send(request, stream=True, follow_redirects=False)
            location = response.headers.get("Location")
            if response.status_code not in _REDIRECTS or not location or method == "HEAD":
                try:
                    yield response
                finally:
                    await response.aclose()
                return
            # Check the commit before leaving the hub for the CDN (which does not say it).
            self._raise_for_status(response, OriginFile(path=target.path, size=0))
            await response.aclose()
            target = target.join(location)
            if target.scheme not in ("http", "https"):
                raise OriginError(f"redirect to a {target.scheme} URL refused", retryable=False)
        raise OriginError(f"more than {MAX_REDIRECTS} redirects from {self.endpoint}")

    def _file_url(self, path: str, revision: str) -> str:
        return f"{self.endpoint}/{self.repo_id}/resolve/{quote(revision, safe='')}/{quote(path)}"

    def pin(self, snapshot: Snapshot) -> None:
        """Adopt a snapshot resolved by another origin of this repo: read at its commit."""
        self._commit = snapshot.revision

    async def aclose(self) -> None:
        """Close the HTTP client if this origin made it."""
        if self._owns_http:
            await self._http.aclose()


def _hub_transport_errors() -> tuple[type[Exception], ...]:
    errors: list[type[Exception]] = [OSError, httpx.HTTPError]
    try:  # huggingface_hub >= 1.0 speaks httpx2; older ones requests (whose errors are OSErrors)
        import httpx2
    except ImportError:
        pass
    else:
        errors.append(httpx2.HTTPError)
    return tuple(errors)


_HUB_TRANSPORT_ERRORS = _hub_transport_errors()


async def _not_the_file(
    response: httpx.Response, file: OriginFile, *, served_size: int, whole: bool
) -> IntegrityError:
    """The error for an origin object that is not the listed file (its size differs).

    An error page or a Git LFS pointer is small and arrives whole: its digest goes into the
    message beside the declared one, with a word on what it looks like. A large object of the
    wrong size is named by its size alone rather than downloaded to be hashed.
    """
    kind, expected = ("size", str(file.size))
    if file.sha256:
        kind, expected = "sha256", file.sha256
    elif file.git_sha1:
        kind, expected = "git-sha1", file.git_sha1
    body = b""
    if kind != "size" and whole and served_size <= _SMALL_BODY:
        body = await response.aread()
    if len(body) != served_size or kind == "size":
        kind, expected, actual = "size", str(file.size), str(served_size)
        looks_like = f"{served_size} bytes"
    elif kind == "sha256":
        actual = hashlib.sha256(body).hexdigest()
        looks_like = _describe(body, response.headers.get("Content-Type", ""))
    else:
        actual = hashlib.sha1(b"blob %d\x00" % len(body) + body).hexdigest()
        looks_like = _describe(body, response.headers.get("Content-Type", ""))
    return IntegrityError(
        f"{file.path}: the origin served {looks_like} for the {file.size}-byte file: "
        f"expected {kind} {expected}, got {actual}",
        path=file.path,
        digest=kind,
        expected=expected,
        actual=actual,
    )


def _describe(body: bytes, content_type: str) -> str:
    head = body[:64].lstrip().lower()
    if head.startswith(b"version https://git-lfs.github.com/spec/"):
        return "a Git LFS pointer"
    if "html" in content_type.lower() or head.startswith((b"<!doctype html", b"<html")):
        return f"an HTML page of {len(body)} bytes"
    return f"{len(body)} bytes"


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _token_digest(token: str | None) -> str:
    if not token:
        return "anonymous"
    # A short keyed digest tells scopes apart without letting the token be recovered.
    return hashlib.sha256(b"weightcache-hf-scope\0" + token.encode()).hexdigest()[:16]


def _origin_of(url: httpx.URL) -> tuple[str, str, int | None]:
    default_port = {"http": 80, "https": 443}.get(url.scheme)
    return url.scheme, url.host, url.port or default_port
