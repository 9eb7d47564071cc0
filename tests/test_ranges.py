"""Range requests (RFC 9110 §14): one planner for both ports, checked against an oracle and
against a real ``weightcache serve`` (its API and its data plane answer the same)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from api.ranges import plan_blob_response
from tests.fixtures.serve_process import ServeProcess, register_local, serve_process

SHA = "ab" * 32
ETAG = f'"{SHA}"'

# --------------------------------------------------------------------------- the oracle
_ASCII_SPEC = re.compile(r"([0-9]+)-([0-9]*)|-([0-9]+)", re.ASCII)
_UNIT = re.compile(r"bytes", re.ASCII | re.IGNORECASE)


def _int(digits: str) -> int:
    # Past 2**64 every number is just "beyond any blob"; int() refuses over 4,300 digits.
    digits = digits.lstrip("0") or "0"
    return int(digits) if len(digits) < 25 else 2**80


def oracle(
    method: str, fields: list[str], if_range: str | None, size: int
) -> tuple[int, int, int, str | None]:
    """(status, start, end, Content-Range) as RFC 9110 §14 reads, written independently of
    ``api.ranges``: regular expressions over ASCII, the list rule of §5.6.1.2 spelled out."""
    whole = (200, 0, size, None)
    if method != "GET" or len(fields) != 1:
        return whole
    if if_range is not None and if_range.strip() != ETAG:
        return whole
    value = fields[0].strip(" \t")
    unit, eq, rest = value.partition("=")
    if not eq or not _UNIT.fullmatch(unit):
        return whole
    elements = rest.split(",")
    if elements[0][:1] in (" ", "\t"):
        return whole  # OWS only next to a comma, never right after "="
    specs = []
    for element in elements:
        element = element.strip(" \t")
        if element == "":
            continue
        match = _ASCII_SPEC.fullmatch(element)
        if match is None:
            return whole
        first, last, suffix = match.groups()
        if suffix is not None:
            specs.append(("suffix", _int(suffix), 0))
        else:
            if last != "" and _int(last) < _int(first):
                return whole
            specs.append(("int", _int(first), _int(last) if last != "" else -1))
    if len(specs) != 1:
        return whole
    kind, a, b = specs[0]
    unsatisfiable = (416, 0, 0, f"bytes */{size}")
    if kind == "suffix":
        if a == 0:
            return unsatisfiable
        if size == 0:
            return whole
        start = max(0, size - a)
        return (206, start, size, f"bytes {start}-{size - 1}/{size}")
    if a >= size:
        return unsatisfiable
    end = size if b < 0 else min(b + 1, size)
    return (206, a, end, f"bytes {a}-{end - 1}/{size}")


# --------------------------------------------------------------------------- headers to try
_numbers = st.one_of(
    st.integers(0, 300).map(str),
    st.integers(0, 300).map(lambda n: f"00{n}"),
    st.just("9" * 40),
    st.sampled_from(["+1", "-1", "1_0", "١٢", "٣", "1 0", " 1", "1 ", "0x1", "1e3", "", "½"]),
)
_spec = st.one_of(
    st.tuples(_numbers, _numbers).map(lambda p: f"{p[0]}-{p[1]}"),
    _numbers.map(lambda n: f"{n}-"),
    _numbers.map(lambda n: f"-{n}"),
    st.sampled_from(["", " ", "-", "--1", "1--2", "1-2-3", "abc"]),
)
_range_set = st.lists(_spec, min_size=1, max_size=3).flatmap(
    lambda specs: st.sampled_from([",", ", ", " ,", "\t,\t"]).map(lambda sep: sep.join(specs))
)
HEADERS = st.one_of(
    st.tuples(
        st.sampled_from(["bytes", "Bytes", "BYTES", "bytes ", " bytes", "items", "bytez", "ſ"]),
        st.sampled_from(["=", "= ", " ="]),
        _range_set,
    ).map("".join),
    st.text(max_size=20),
)
FIXED = [
    "bytes=0-0", "bytes=0-", "bytes=-1", "bytes=-0", "bytes=0-99999999999999999999999",
    "bytes=-99999999999999999999", "bytes=+1-2", "bytes=1_0-20", "bytes=١-٢", "bytes=5-1",
    "bytes= 0-1", "bytes =0-1", "bytes=0 -1", "bytes=0-1,", "bytes=,0-1", "bytes=0-1, 4-5",
    "bytes=0-1,,", "BYTES=2-3", "items=0-1", "bytes=", "bytes", "bytes=-", "bytes=1-1",
    "bytes=999999-", "bytes=0-" + "9" * 5000, "bytes=" + "0" * 5000 + "1-2",
]


@given(
    header=HEADERS,
    size=st.integers(0, 300),
    method=st.sampled_from(["GET", "GET", "GET", "HEAD"]),
    if_range=st.sampled_from([None, None, ETAG, f" {ETAG} ", f"W/{ETAG}", '"other"']),
)
def test_the_planner_agrees_with_the_oracle(
    header: str, size: int, method: str, if_range: str | None
) -> None:
    answer = plan_blob_response(
        method=method, range_fields=[header], if_range=if_range, sha256=SHA, size=size
    )
    status, start, end, content_range = oracle(method, [header], if_range, size)
    assert answer.status == status
    assert answer.headers.get("Content-Range") == content_range
    assert answer.headers["ETag"] == ETAG
    assert answer.headers["Accept-Ranges"] == "bytes"
    if status != 416:
        assert (answer.start, answer.end) == (start, end)
        assert answer.headers["Content-Length"] == str(end - start)
        assert answer.send_body == (method == "GET")


def test_fixed_cases_agree_with_the_oracle() -> None:
    for size in (0, 1, 10, 1000):
        for header in FIXED:
            answer = plan_blob_response(
                method="GET", range_fields=[header], if_range=None, sha256=SHA, size=size
            )
            assert answer.status == oracle("GET", [header], None, size)[0], (header, size)


def test_two_range_fields_are_ignored() -> None:
    answer = plan_blob_response(
        method="GET", range_fields=["bytes=0-1", "bytes=2-3"], if_range=None, sha256=SHA, size=9
    )
    assert (answer.status, answer.start, answer.end) == (200, 0, 9)


# --------------------------------------------------------------------------- both ports
@dataclass
class Blobs:
    node: ServeProcess
    blobs: dict[str, bytes]  # sha256 → bytes, one with data, one empty


@pytest.fixture(scope="module")
def blobs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blobs]:
    tmp = tmp_path_factory.mktemp("ranges")
    source = tmp / "model"
    source.mkdir()
    data = bytes(range(256)) * 40 + b"tail"
    (source / "weights.txt").write_bytes(data)
    (source / "empty.txt").write_bytes(b"")
    with serve_process(tmp, workers=1) as node:
        with node.client() as client:
            register_local(client, "r", source)
        yield Blobs(node, {hashlib.sha256(d).hexdigest(): d for d in (data, b"")})


def _raw(value: str) -> bytes:
    return value.encode("utf-8")  # non-ASCII goes out as UTF-8 bytes, as a client may send it


def _both(node: ServeProcess, method: str, sha: str, headers: dict[bytes, bytes]) -> list[
    httpx.Response
]:
    return [
        httpx.request(method, f"{base}/v1/blobs/{sha}", headers=headers, timeout=30)
        for base in (node.url, node.data_url)
    ]


def _same(api: httpx.Response, data: httpx.Response, expected: bytes, header: str) -> None:
    assert api.status_code == data.status_code, header
    for name in ("content-range", "content-length", "etag", "accept-ranges", "content-type"):
        assert api.headers.get(name) == data.headers.get(name), (header, name)
    if api.status_code == 416:
        assert api.json()["error"]["code"] == data.json()["error"]["code"]
        return
    assert api.content == data.content, header
    size = len(expected)
    status, start, end, content_range = oracle("GET", [header], None, size)
    assert (api.status_code, api.headers.get("content-range")) == (status, content_range)
    assert api.content == expected[start:end]


def test_both_ports_answer_fixed_cases_the_same(blobs: Blobs) -> None:
    for sha, expected in blobs.blobs.items():
        for header in FIXED:
            api, data = _both(blobs.node, "GET", sha, {b"Range": _raw(header)})
            _same(api, data, expected, header)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(header=HEADERS)
def test_both_ports_answer_any_range_the_same(blobs: Blobs, header: str) -> None:
    header = header.strip(" \t")  # what a client can put on the wire: no edge OWS, no CTLs
    assume(not any(ord(c) < 0x20 or ord(c) == 0x7F for c in header))
    for sha, expected in blobs.blobs.items():
        api, data = _both(blobs.node, "GET", sha, {b"Range": _raw(header)})
        _same(api, data, expected, header)


def test_head_has_the_headers_of_get_and_no_body(blobs: Blobs) -> None:
    for sha, expected in blobs.blobs.items():
        gets = _both(blobs.node, "GET", sha, {})
        for ranged in ({}, {b"Range": b"bytes=0-0"}):  # HEAD applies no Range (RFC 9110 14.2)
            heads = _both(blobs.node, "HEAD", sha, ranged)
            for head, get in zip(heads, gets, strict=True):
                assert head.status_code == 200
                assert head.content == b""
                assert get.status_code == 200
                assert get.content == expected
                for name in ("content-length", "accept-ranges", "etag", "content-type"):
                    assert head.headers.get(name) == get.headers.get(name), name
                assert head.headers["content-length"] == str(len(expected))


def test_head_and_get_refusals_are_the_same_on_both_ports(blobs: Blobs) -> None:
    sha = next(iter(blobs.blobs))
    for method in ("GET", "HEAD"):
        for path in (f"/v1/blobs/{'cd' * 32}", "/v1/blobs/not-a-digest"):
            api, data = (
                httpx.request(method, f"{base}{path}", timeout=30)
                for base in (blobs.node.url, blobs.node.data_url)
            )
            assert api.status_code == data.status_code
            assert api.status_code in (400, 404)
            assert api.headers["content-type"] == data.headers["content-type"]
            if method == "HEAD":
                assert api.content == data.content == b""
            else:
                assert api.content == data.content
    assert _both(blobs.node, "HEAD", sha, {})[0].status_code == 200
