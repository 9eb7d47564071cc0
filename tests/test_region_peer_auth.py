"""Peer authentication: the region secret, in its own scheme, never a tenant."""

from __future__ import annotations

import logging

import pytest
from pydantic import SecretStr

from cache_node.errors import Unauthorized
from cache_node.region import PEER_SCHEME, Peer, RegionSecret, is_peer_authorization

SECRET = "s3cr3t-" + "x" * 40


def test_a_peer_with_the_secret_is_a_node_not_a_tenant() -> None:
    secret = RegionSecret(SecretStr(SECRET))
    headers = secret.headers("node-a")
    assert headers["Authorization"].startswith(f"{PEER_SCHEME} node-a:")
    peer = RegionSecret(SECRET).authenticate(headers["Authorization"])
    assert peer == Peer(node_id="node-a")
    assert not hasattr(peer, "tenant")


@pytest.mark.parametrize(
    ("header", "reason"),
    [
        (None, "missing"),
        ("", "missing"),
        (f"Bearer {SECRET}", "missing"),  # a tenant's scheme never passes as a peer
        (f"{PEER_SCHEME} node-a", "malformed"),
        (f"{PEER_SCHEME} node-a:", "malformed"),
        (f"{PEER_SCHEME} :{SECRET}", "malformed"),
        (f"{PEER_SCHEME} no de:{SECRET}", "malformed"),
        (f"{PEER_SCHEME} node-a:{SECRET}x", "bad_secret"),
        (f"{PEER_SCHEME} node-a:{SECRET[:-1]}", "bad_secret"),
        (f"{PEER_SCHEME} node-a:{'y' * len(SECRET)}", "bad_secret"),
    ],
)
def test_anything_else_is_refused_with_a_reason(
    header: str | None, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="weightcache.events")
    with pytest.raises(Unauthorized) as refused:
        RegionSecret(SECRET).authenticate(header)
    assert refused.value.http_status == 401
    assert refused.value.details["reason"] == reason
    assert SECRET not in str(refused.value.to_dict())
    events = [r for r in caplog.records if r.getMessage() == "peer.refused"]
    assert len(events) == 1
    assert SECRET not in repr(events[0].__dict__)


def test_the_scheme_tells_peers_from_tenants() -> None:
    assert is_peer_authorization(f"{PEER_SCHEME} n:x")
    assert is_peer_authorization(f"{PEER_SCHEME.lower()} n:x")
    assert not is_peer_authorization(f"Bearer {SECRET}")
    assert not is_peer_authorization(None)
    assert not is_peer_authorization(PEER_SCHEME + "X n:x")


def test_a_weak_secret_is_refused_and_the_secret_is_never_shown() -> None:
    for weak in ("", "short", "x" * 31, f" {SECRET}"):
        with pytest.raises(ValueError, match="at least 32 characters") as caught:
            RegionSecret(weak)
        if weak:
            assert weak.strip() not in str(caught.value)
    secret = RegionSecret(SECRET)
    assert SECRET not in repr(secret)
    assert SECRET not in str(secret)
    assert secret.matches(SECRET)
    assert not secret.matches(SECRET.upper())
