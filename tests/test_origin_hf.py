"""``hf://`` origin against the fixture hub: pinning, listing, ranged reads, auth and faults."""

from __future__ import annotations

import gzip
import hashlib
import os
import random
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from huggingface_hub import hf_hub_download
from pydantic import SecretStr

from cache_node.errors import (
    IntegrityError,
    InvalidInput,
    OriginError,
    OriginNotFound,
    OriginUnauthorized,
)
from cache_node.origins.base import OriginFile, Snapshot, parse_source
from cache_node.origins.hf import HFOrigin, parse_retry_after
from cache_node.settings import HFSettings
from tests.fixtures import hf_hub as hub_fixtures
from tests.fixtures.hf_hub import HTML_ERROR_PAGE, FixtureHub, git_blob_sha1, lfs_pointer

hf_hub = hub_fixtures.hf_hub  # the fixture, by the name tests ask for

TOKEN = "hf_test_secret_token_0123456789"
BIG = random.Random(7).randbytes(3 * 1024 * 1024 + 123)  # crosses 1 MiB chunks, is LFS
SMALL_CONFIG = b'{"model_type": "llama", "hidden_size": 64}\n'


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _no_ambient_hf_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HF_TOKEN", "HF_ENDPOINT", "WEIGHTCACHE_HF_TOKEN", "WEIGHTCACHE_HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)


def make_origin(
    hub: FixtureHub,
    source: str,
    *,
    token: str | None = None,
    include: list[str] | None = None,
    http: httpx.AsyncClient | None = None,
) -> HFOrigin:
    settings = HFSettings(endpoint=hub.endpoint, token=SecretStr(token) if token else None)
    return HFOrigin(parse_source(source), settings=settings, include=include, http=http)


async def read(origin: HFOrigin, file: OriginFile, start: int, end: int) -> bytes:
    return b"".join([chunk async for chunk in origin.read_range(file, start, end)])


async def read_into(
    origin: HFOrigin, file: OriginFile, start: int, end: int, received: bytearray
) -> None:
    """Append each chunk to ``received`` as it comes, so a read that fails keeps its prefix."""
    async for chunk in origin.read_range(file, start, end):
        received += chunk


def by_path(snapshot: Snapshot) -> dict[str, OriginFile]:
    return {f.path: f for f in snapshot.files}


@pytest.fixture
async def origin_of(hf_hub: FixtureHub) -> AsyncIterator[list[HFOrigin]]:
    """Collects origins a test opens, and closes them."""
    opened: list[HFOrigin] = []
    yield opened
    for origin in opened:
        await origin.aclose()


async def resolved(
    hub: FixtureHub, opened: list[HFOrigin], files: dict[str, bytes], **kwargs: object
) -> tuple[HFOrigin, dict[str, OriginFile]]:
    """A public repo holding ``files``, resolved: the origin and its files by path."""
    hub.add_repo("org/faults", files)
    origin = make_origin(hub, "hf://org/faults", **kwargs)  # type: ignore[arg-type]
    opened.append(origin)
    return origin, by_path(await origin.resolve())


# -- resolve ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_resolve_pins_main_and_lists_digests(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    hf_hub.page_size = 2  # the listing spans pages: the Link header is followed
    commit = hf_hub.add_repo(
        "org/model",
        {
            "config.json": SMALL_CONFIG,
            "model.safetensors": BIG,
            "sub/dir/tokenizer.json": b"{}",
            "sub/readme.md": b"# hi\n",
            "image.png": b"\x89PNG",
            ".gitattributes": b"*.safetensors filter=lfs\n",
        },
    )
    origin = make_origin(hf_hub, "hf://org/model")
    origin_of.append(origin)
    snapshot = await origin.resolve()

    assert snapshot.revision == commit
    assert snapshot.source == "hf://org/model"
    files = by_path(snapshot)
    assert sorted(files) == [
        "config.json",
        "model.safetensors",
        "sub/dir/tokenizer.json",
        "sub/readme.md",
    ]
    weights = files["model.safetensors"]
    assert weights.size == len(BIG)
    assert weights.sha256 == hashlib.sha256(BIG).hexdigest()
    assert weights.git_sha1 is None  # the tree's blob id is the LFS pointer's, not the bytes'
    config = files["config.json"]
    assert config.sha256 is None
    assert config.git_sha1 == git_blob_sha1(SMALL_CONFIG)
    assert config.size == len(SMALL_CONFIG)
    assert all(f.has_digest for f in snapshot.files)


@pytest.mark.anyio
async def test_snapshot_stays_on_its_commit_when_main_moves(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    first = hf_hub.add_repo("org/moving", {"config.json": b"old"})
    origin = make_origin(hf_hub, "hf://org/moving")
    origin_of.append(origin)
    old = by_path(await origin.resolve())["config.json"]

    second = hf_hub.add_repo("org/moving", {"config.json": b"new!"})
    assert second != first
    assert await read(origin, old, 0, old.size) == b"old"

    fresh = make_origin(hf_hub, "hf://org/moving")
    origin_of.append(fresh)
    snapshot = await fresh.resolve()
    assert snapshot.revision == second
    assert await read(fresh, by_path(snapshot)["config.json"], 0, 4) == b"new!"

    pinned = make_origin(hf_hub, f"hf://org/moving@{first}")
    origin_of.append(pinned)
    assert (await pinned.resolve()).revision == first


@pytest.mark.anyio
async def test_branch_revision(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    hf_hub.add_repo("org/branchy", {"config.json": b"main"})
    dev = hf_hub.add_repo("org/branchy", {"config.json": b"dev"}, branch="dev")
    origin = make_origin(hf_hub, "hf://org/branchy@dev")
    origin_of.append(origin)
    snapshot = await origin.resolve()
    assert snapshot.revision == dev
    assert await read(origin, by_path(snapshot)["config.json"], 0, 3) == b"dev"


@pytest.mark.anyio
async def test_default_selection_skips_duplicate_weights(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    hf_hub.add_repo(
        "org/both",
        {"model.safetensors": b"st", "pytorch_model.bin": b"pt", "config.json": b"{}"},
    )
    hf_hub.add_repo("org/binonly", {"pytorch_model.bin": b"pt", "config.json": b"{}"})
    both = make_origin(hf_hub, "hf://org/both")
    binonly = make_origin(hf_hub, "hf://org/binonly")
    picked = make_origin(hf_hub, "hf://org/both", include=["*.bin"])
    origin_of.extend([both, binonly, picked])
    assert sorted(by_path(await both.resolve())) == ["config.json", "model.safetensors"]
    assert sorted(by_path(await binonly.resolve())) == ["config.json", "pytorch_model.bin"]
    assert sorted(by_path(await picked.resolve())) == ["pytorch_model.bin"]


@pytest.mark.anyio
async def test_unsafe_path_in_listing_is_refused(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    hf_hub.add_repo("org/evil", {"/etc/passwd.json": b"{}", "config.json": b"{}"})
    origin = make_origin(hf_hub, "hf://org/evil")
    origin_of.append(origin)
    with pytest.raises(InvalidInput):
        await origin.resolve()


@pytest.mark.anyio
async def test_mirror_without_sha_pins_by_repo_commit_header(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    commit = hf_hub.add_repo("org/mirror", {"config.json": b"{}"})
    hf_hub.omit_sha = True
    origin = make_origin(hf_hub, "hf://org/mirror")
    origin_of.append(origin)
    assert (await origin.resolve()).revision == commit


@pytest.mark.anyio
async def test_hub_ignoring_revisions_is_caught(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    first = hf_hub.add_repo("org/sloppy", {"config.json": b"old"})
    origin = make_origin(hf_hub, "hf://org/sloppy")
    origin_of.append(origin)
    old = by_path(await origin.resolve())["config.json"]
    hf_hub.add_repo("org/sloppy", {"config.json": b"new"})
    hf_hub.ignore_revision = True

    with pytest.raises(OriginError, match="pinned") as read_error:
        await read(origin, old, 0, old.size)  # the hub serves main's bytes: refused (I9)
    assert not read_error.value.retryable

    pinned = make_origin(hf_hub, f"hf://org/sloppy@{first}")
    origin_of.append(pinned)
    with pytest.raises(OriginError, match="does not honour") as resolve_error:
        await pinned.resolve()
    assert not resolve_error.value.retryable


# -- auth ------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_private_repo_needs_the_token(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    hf_hub.add_repo("org/private", {"config.json": SMALL_CONFIG}, private=True, token=TOKEN)
    for token in (None, "hf_wrong_token"):
        origin = make_origin(hf_hub, "hf://org/private", token=token)
        origin_of.append(origin)
        with pytest.raises(OriginUnauthorized) as failure:
            await origin.resolve()
        assert failure.value.code == "unauthorized"
        assert failure.value.status == 401
        assert not failure.value.retryable
        assert TOKEN not in str(failure.value.to_dict())

    origin = make_origin(hf_hub, "hf://org/private", token=TOKEN)
    origin_of.append(origin)
    config = by_path(await origin.resolve())["config.json"]
    assert await read(origin, config, 0, config.size) == SMALL_CONFIG
    assert hf_hub.request_headers("config.json")[-1]["authorization"] == f"Bearer {TOKEN}"


@pytest.mark.anyio
async def test_gated_repo_without_access_is_unauthorized(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    hf_hub.add_repo("org/gated", {"model.safetensors": BIG}, gated=True, token=TOKEN)
    for token, status in ((None, 401), ("hf_not_approved", 403)):
        origin = make_origin(hf_hub, "hf://org/gated", token=token)
        origin_of.append(origin)
        with pytest.raises(OriginUnauthorized, match="gated") as failure:
            await origin.resolve()
        assert failure.value.code == "unauthorized"
        assert failure.value.status == status
    assert hf_hub.requests("model.safetensors") == 0  # found out by HEAD, no bytes moved

    approved = make_origin(hf_hub, "hf://org/gated", token=TOKEN)
    origin_of.append(approved)
    weights = by_path(await approved.resolve())["model.safetensors"]
    assert await read(approved, weights, 10, 20) == BIG[10:20]


@pytest.mark.anyio
async def test_scope_separates_credentials_without_revealing_them(hf_hub: FixtureHub) -> None:
    anonymous = make_origin(hf_hub, "hf://org/x")
    alice = make_origin(hf_hub, "hf://org/x", token=TOKEN)
    bob = make_origin(hf_hub, "hf://org/x", token=TOKEN + "b")
    scopes = [o.scope for o in (anonymous, alice, bob)]
    assert scopes[0] == f"{hf_hub.endpoint}#anonymous"
    assert len(set(scopes)) == 3
    assert all(s.startswith(hf_hub.endpoint) and TOKEN not in s for s in scopes)
    assert make_origin(hf_hub, "hf://org/y", token=TOKEN).scope == alice.scope
    for origin in (anonymous, alice, bob):
        await origin.aclose()


# -- not found and unreachable -----------------------------------------------------------------


@pytest.mark.anyio
async def test_missing_repo_and_revision_are_not_found(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    hf_hub.add_repo("org/real", {"config.json": b"{}"})
    for source in ("hf://org/nope", "hf://org/real@no-such-branch", f"hf://org/real@{'0' * 40}"):
        origin = make_origin(hf_hub, source)
        origin_of.append(origin)
        with pytest.raises(OriginNotFound) as failure:
            await origin.resolve()
        assert failure.value.code == "origin_not_found"
        assert not failure.value.retryable


@pytest.mark.anyio
async def test_unreachable_hub_is_retryable() -> None:
    settings = HFSettings(endpoint="http://127.0.0.1:9")  # discard port: nothing listens
    origin = HFOrigin(parse_source("hf://org/model"), settings=settings)
    with pytest.raises(OriginError) as failure:
        await origin.resolve()
    assert failure.value.retryable
    await origin.aclose()


# -- ranged reads ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_read_range_returns_exact_bytes(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    origin, files = await resolved(hf_hub, origin_of, {"model.safetensors": BIG})
    weights = files["model.safetensors"]
    size = len(BIG)
    mib = 1024 * 1024
    for start, end in [(0, size), (0, 1), (size - 1, size), (mib - 3, 2 * mib + 5), (17, 4099)]:
        assert await read(origin, weights, start, end) == BIG[start:end], (start, end)
    assert await read(origin, weights, 5, 5) == b""
    headers = hf_hub.request_headers("model.safetensors")[-1]
    assert headers["range"] == "bytes=17-4098"
    assert headers["accept-encoding"] == "identity"
    assert "authorization" not in headers  # anonymous origin


@pytest.mark.anyio
async def test_chunks_are_about_one_mib(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    origin, files = await resolved(hf_hub, origin_of, {"model.safetensors": BIG})
    chunks = [c async for c in origin.read_range(files["model.safetensors"], 0, len(BIG))]
    assert max(len(c) for c in chunks) == 1024 * 1024
    assert b"".join(chunks) == BIG


@pytest.mark.anyio
async def test_closing_the_stream_early_is_clean(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    origin, files = await resolved(hf_hub, origin_of, {"model.safetensors": BIG})
    stream = origin.read_range(files["model.safetensors"], 0, len(BIG))
    first = await anext(stream)
    await stream.aclose()  # type: ignore[attr-defined]
    assert first == BIG[: len(first)]


# -- origin faults ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_503_twice_is_retryable_then_succeeds(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-503x2.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    for _ in range(2):
        with pytest.raises(OriginError) as failure:
            await read(origin, files[name], 0, 100)
        assert failure.value.retryable
        assert failure.value.status == 503
    assert await read(origin, files[name], 0, 100) == BIG[:100]
    assert hf_hub.requests(name) == 3


@pytest.mark.anyio
async def test_429_carries_retry_after(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    name = "fault-429.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    with pytest.raises(OriginError) as failure:
        await read(origin, files[name], 0, 100)
    assert failure.value.retryable
    assert failure.value.status == 429
    assert failure.value.retry_after == 1
    assert await read(origin, files[name], 0, 100) == BIG[:100]


@pytest.mark.anyio
async def test_500_forever_stays_retryable(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    name = "fault-500.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    for _ in range(3):
        with pytest.raises(OriginError) as failure:
            await read(origin, files[name], 0, 100)
        assert failure.value.retryable
        assert failure.value.status == 500


@pytest.mark.anyio
async def test_server_ignoring_range_still_gives_exact_bytes(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-norange.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    start, end = 1024 * 1024 + 7, 2 * 1024 * 1024 + 9
    assert await read(origin, files[name], start, end) == BIG[start:end]
    assert await read(origin, files[name], 0, 10) == BIG[:10]


@pytest.mark.anyio
async def test_range_starting_elsewhere(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    name = "fault-badrange.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    # The server starts one byte early: that byte is skipped.
    assert await read(origin, files[name], 1000, 5000) == BIG[1000:5000]
    # The server starts one byte late: nothing of it is trusted.
    with pytest.raises(OriginError, match="sent 1-") as failure:
        await read(origin, files[name], 0, 5000)
    assert failure.value.retryable


@pytest.mark.anyio
async def test_redirect_to_another_host_drops_authorization(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-redirect.safetensors"
    hf_hub.add_repo("org/cdn", {name: BIG}, private=True, token=TOKEN)
    origin = make_origin(hf_hub, "hf://org/cdn", token=TOKEN)
    origin_of.append(origin)
    weights = by_path(await origin.resolve())[name]
    assert await read(origin, weights, 100, 200_000) == BIG[100:200_000]

    hub_hop, cdn_hop = hf_hub.request_headers(name)[-2:]
    assert hub_hop["host"] == f"127.0.0.1:{hf_hub.port}"
    assert hub_hop["authorization"] == f"Bearer {TOKEN}"
    assert cdn_hop["host"] == f"localhost:{hf_hub.port}"
    assert "authorization" not in cdn_hop
    assert cdn_hop["range"] == "bytes=100-199999"


@pytest.mark.anyio
async def test_gzip_whole_body_is_decoded_and_trimmed(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-gzip.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    assert await read(origin, files[name], 3000, 2_000_000) == BIG[3000:2_000_000]


@pytest.mark.anyio
async def test_gzip_on_a_range_is_refused(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    name = "fault-gzip206.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    with pytest.raises(OriginError, match="identity") as failure:
        await read(origin, files[name], 10, 5000)
    assert failure.value.retryable


@pytest.mark.anyio
async def test_connection_reset_midway(hf_hub: FixtureHub, origin_of: list[HFOrigin]) -> None:
    name = "fault-reset50.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    received = bytearray()
    with pytest.raises(OriginError) as failure:
        await read_into(origin, files[name], 0, len(BIG), received)
    assert failure.value.retryable
    assert len(received) < len(BIG)
    assert bytes(received) == BIG[: len(received)]  # what came before the reset is good
    rest = await read(origin, files[name], len(received), len(BIG))
    assert bytes(received) + rest == BIG


@pytest.mark.anyio
async def test_stalled_stream_times_out_as_retryable(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-stall.safetensors"
    hf_hub.stall_s = 30.0  # released when the hub closes
    http = httpx.AsyncClient(timeout=httpx.Timeout(0.5))
    origin, files = await resolved(hf_hub, origin_of, {name: BIG}, http=http)
    received = bytearray()
    with pytest.raises(OriginError) as failure:
        await read_into(origin, files[name], 0, len(BIG), received)
    assert failure.value.retryable
    assert bytes(received) == BIG[: len(received)]
    await http.aclose()


@pytest.mark.anyio
@pytest.mark.parametrize("fault", ["fault-short", "fault-long"])
async def test_origin_object_of_another_size_is_an_integrity_error(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
    fault: str,
) -> None:
    name = f"{fault}.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    served = len(BIG) - 1 if fault == "fault-short" else len(BIG) + 1
    with pytest.raises(IntegrityError) as failure:
        await read(origin, files[name], 0, 100)
    assert failure.value.details["expected"] == str(len(BIG))
    assert failure.value.details["actual"] == str(served)


@pytest.mark.anyio
async def test_lfs_pointer_is_an_integrity_error_naming_both_digests(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-lfs-pointer.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    with pytest.raises(IntegrityError, match="Git LFS pointer") as failure:
        await read(origin, files[name], 0, len(BIG))
    assert failure.value.details["expected"] == hashlib.sha256(BIG).hexdigest()
    assert failure.value.details["actual"] == hashlib.sha256(lfs_pointer(BIG)).hexdigest()
    # A part past the pointer's end gets 416 from the hub: the sizes still tell.
    with pytest.raises(IntegrityError) as failure:
        await read(origin, files[name], 1024 * 1024, len(BIG))
    assert failure.value.details["expected"] == str(len(BIG))
    assert failure.value.details["actual"] == str(len(lfs_pointer(BIG)))


@pytest.mark.anyio
async def test_html_error_page_with_200_is_an_integrity_error(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    big_name, small_name = "fault-html.safetensors", "fault-html.json"
    origin, files = await resolved(hf_hub, origin_of, {big_name: BIG, small_name: SMALL_CONFIG})
    with pytest.raises(IntegrityError, match="HTML page") as failure:
        await read(origin, files[big_name], 1000, 2000)
    assert failure.value.details["digest"] == "sha256"
    assert failure.value.details["actual"] == hashlib.sha256(HTML_ERROR_PAGE).hexdigest()
    with pytest.raises(IntegrityError, match="HTML page") as failure:
        await read(origin, files[small_name], 0, len(SMALL_CONFIG))
    assert failure.value.details["digest"] == "git-sha1"
    assert failure.value.details["expected"] == git_blob_sha1(SMALL_CONFIG)
    assert failure.value.details["actual"] == git_blob_sha1(HTML_ERROR_PAGE)


@pytest.mark.anyio
async def test_flipped_bit_passes_through_for_the_fetcher_to_catch(
    hf_hub: FixtureHub,
    origin_of: list[HFOrigin],
) -> None:
    name = "fault-flip.safetensors"
    origin, files = await resolved(hf_hub, origin_of, {name: BIG})
    got = await read(origin, files[name], 0, len(BIG))
    assert len(got) == len(BIG)
    assert hashlib.sha256(got).hexdigest() != files[name].sha256


def test_parse_retry_after() -> None:
    now = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    later = (now + timedelta(seconds=90)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after(" 1.5 ") == 1.5
    assert parse_retry_after(later, now=now) == 90.0
    assert parse_retry_after("Mon, 01 Jan 2001 00:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None


# -- the fixture hub itself ------------------------------------------------------------------


def test_fixture_git_blob_ids_match_git() -> None:
    # Known values from `git hash-object`.
    assert git_blob_sha1(b"") == "e69de29bb2d1d6434b8b29ae775ad8c2e48c5391"
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_fixture_serves_integrity_faults(hf_hub: FixtureHub) -> None:
    data = os.urandom(4096)
    names = ["flip", "short", "long", "html", "lfs-pointer"]
    hf_hub.add_repo("org/bad", {f"fault-{n}.bin": data for n in names})
    with httpx.Client(base_url=hf_hub.endpoint) as client:
        served = {n: client.get(f"/org/bad/resolve/main/fault-{n}.bin").content for n in names}
        listing = client.get("/api/models/org/bad/tree/main").json()
    flipped = [i for i, (a, b) in enumerate(zip(served["flip"], data, strict=True)) if a != b]
    assert len(flipped) == 1
    assert bin(served["flip"][flipped[0]] ^ data[flipped[0]]).count("1") == 1
    assert served["short"] == data[:-1]
    assert served["long"][:-1] == data
    assert len(served["long"]) == len(data) + 1
    assert served["html"] == HTML_ERROR_PAGE
    assert served["lfs-pointer"] == lfs_pointer(data)
    # The listing declares the real bytes throughout.
    assert {e["size"] for e in listing} == {len(data)}
    assert {e["oid"] for e in listing} == {git_blob_sha1(data)}


def test_fixture_range_and_counters(hf_hub: FixtureHub) -> None:
    hf_hub.add_repo("org/r", {"model.safetensors": BIG})
    url = "/org/r/resolve/main/model.safetensors"
    with httpx.Client(base_url=hf_hub.endpoint) as client:
        part = client.get(url, headers={"Range": "bytes=10-19"})
        tail = client.get(url, headers={"Range": "bytes=-5"})
        beyond = client.get(url, headers={"Range": f"bytes={len(BIG)}-"})
        head = client.head(url)
        gz = client.get(url.replace("model", "x"))
    assert part.status_code == 206
    assert part.content == BIG[10:20]
    assert part.headers["content-range"] == f"bytes 10-19/{len(BIG)}"
    assert tail.content == BIG[-5:]
    assert beyond.status_code == 416
    assert head.headers["x-linked-etag"] == f'"{hashlib.sha256(BIG).hexdigest()}"'
    assert head.headers["x-linked-size"] == str(len(BIG))
    assert head.headers["x-repo-commit"] == part.headers["x-repo-commit"]
    assert gz.status_code == 404
    assert gz.headers["x-error-code"] == "EntryNotFound"
    assert hf_hub.requests("model.safetensors") == 3  # GETs only
    assert hf_hub.bytes_sent("model.safetensors") == 15


def test_fixture_gzip_fault_compresses(hf_hub: FixtureHub) -> None:
    hf_hub.add_repo("org/z", {"fault-gzip.bin": b"abc" * 1000})
    with (
        httpx.Client(base_url=hf_hub.endpoint) as client,
        client.stream("GET", "/org/z/resolve/main/fault-gzip.bin") as response,
    ):
        raw = b"".join(response.iter_raw())
    assert response.headers["content-encoding"] == "gzip"
    assert gzip.decompress(raw) == b"abc" * 1000


def test_fixture_works_with_hf_hub_download(hf_hub: FixtureHub, tmp_path: object) -> None:
    commit = hf_hub.add_repo(
        "org/dl", {"model.safetensors": BIG, "config.json": SMALL_CONFIG}, private=True, token=TOKEN
    )
    for name, data in (("model.safetensors", BIG), ("config.json", SMALL_CONFIG)):
        path = hf_hub_download(
            "org/dl", name, endpoint=hf_hub.endpoint, token=TOKEN, cache_dir=str(tmp_path)
        )
        with open(path, "rb") as fh:
            assert fh.read() == data
        assert f"snapshots/{commit}/" in path


def test_retry_after_never_raises_and_ignores_nonsense() -> None:
    # one parser for every origin: a "-0000" date (naive datetime) once raised TypeError in the
    # S3 origin, turning a retryable 503 into an internal error
    from cache_node.origins.s3 import _retry_after

    now = datetime(2026, 1, 1, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 00:00:30 -0000", now=now) == 30.0
    assert _retry_after({"Retry-After": "Thu, 01 Jan 2026 00:00:30 -0000"}) is not None
    for nonsense in ("nan", "inf", "-5", "1e400", "٣", "3 s", "Mon, 99 Foo 2026 99:99:99 GMT"):
        assert parse_retry_after(nonsense, now=now) is None, nonsense
        assert _retry_after({"retry-after": nonsense}) is None, nonsense
