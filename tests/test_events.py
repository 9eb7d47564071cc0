"""Structured events: JSON lines with the fields given, and no secret ever in a line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

from cache_node import events


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    root = logging.getLogger("weightcache")
    saved = (root.handlers[:], root.level, root.propagate)
    yield
    root.handlers[:], root.level, root.propagate = saved[0], saved[1], saved[2]


@pytest.fixture
def captured() -> io.StringIO:
    stream = io.StringIO()
    events.configure_logging("json")
    handler = logging.getLogger("weightcache").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_event_is_one_json_line_with_its_fields(captured: io.StringIO) -> None:
    events.emit("warm.failed", level=logging.WARNING, pipeline="p", code="origin_error",
                retry_at=12.5)
    (line,) = lines(captured)
    assert line["event"] == "warm.failed"
    assert line["level"] == "warning"
    assert (line["pipeline"], line["code"], line["retry_at"]) == ("p", "origin_error", 12.5)


def test_secrets_never_reach_a_line(captured: io.StringIO) -> None:
    signed = ("https://bucket.s3.example/obj?X-Amz-Signature=deadbeef&X-Amz-Credential=AKIA1"
              "&X-Amz-Security-Token=sekrit")
    events.emit("origin.redirect", token="tok-a", hf_token="hf_abc", url=signed,
                message=f"GET https://user:pw@hub.example/x?token=zzz failed; then {signed}")
    text = captured.getvalue()
    for secret in ("tok-a", "hf_abc", "deadbeef", "AKIA1", "sekrit", "pw@", "zzz"):
        assert secret not in text
    (line,) = lines(captured)
    assert line["token"] == "***"
    assert line["url"] == "https://bucket.s3.example/obj?…"


def test_text_format_names_the_event_and_fields() -> None:
    stream = io.StringIO()
    events.configure_logging("text")
    handler = logging.getLogger("weightcache").handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(stream)
    events.emit("pipeline.evicted", pipeline="p", reason="capacity")
    assert "pipeline.evicted pipeline=p reason=capacity" in stream.getvalue()


def test_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="text or json"):
        events.configure_logging("xml")
