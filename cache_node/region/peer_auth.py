"""How nodes of a region recognise each other: a shared region secret, never a tenant token.

A node filling a blob from a peer sends ``Authorization: WeightcacheNode <node_id>:<secret>``.
The scheme is not ``Bearer`` on purpose: a peer credential can never be looked up in the tenants'
token map, and a tenant's token can never pass as a peer's, whatever their values. A request
that authenticates this way is a :class:`Peer` (a node id, no tenant): what it may read is
decided by the node's peer routes alone (blobs by digest, for a fill), so it never widens what
any tenant can reach (I7).

The secret is compared in constant time, and as a SHA-256 of each side so that not even its
length leaks through timing. The node id in the header is for logs and metrics only: every
node holds the same secret, so the id is a claim, not an identity.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass

from pydantic import SecretStr

from cache_node.errors import Unauthorized
from cache_node.events import emit
from cache_node.region.keys import check_node_id

__all__ = ["MIN_SECRET_LENGTH", "PEER_SCHEME", "Peer", "RegionSecret", "is_peer_authorization"]

PEER_SCHEME = "WeightcacheNode"
#: Shorter secrets are refused at start: a region secret guards every blob of the region.
MIN_SECRET_LENGTH = 32


@dataclass(frozen=True)
class Peer:
    """Another node of the region, authenticated by the region secret. Deliberately no tenant:
    a peer is never mapped to one."""

    node_id: str


def is_peer_authorization(header: str | None) -> bool:
    """Whether an ``Authorization`` header uses the peer scheme (so the API's tenant auth must
    not look it up as a token, and the peer check must)."""
    if not header:
        return False
    scheme, _, _ = header.partition(" ")
    return scheme.lower() == PEER_SCHEME.lower()


class RegionSecret:
    """The region's shared secret: the headers a node sends, the check a node makes."""

    def __init__(self, secret: SecretStr | str) -> None:
        value = secret.get_secret_value() if isinstance(secret, SecretStr) else secret
        if len(value) < MIN_SECRET_LENGTH or value != value.strip():
            raise ValueError(
                f"the region secret must be at least {MIN_SECRET_LENGTH} characters, "
                "without surrounding whitespace"
            )
        self._secret = SecretStr(value)
        self._digest = _digest(value)

    def __repr__(self) -> str:
        return "RegionSecret('**********')"

    def headers(self, node_id: str) -> dict[str, str]:
        """The headers of a request from ``node_id`` to a peer."""
        check_node_id(node_id)
        return {"Authorization": f"{PEER_SCHEME} {node_id}:{self._secret.get_secret_value()}"}

    def matches(self, candidate: str) -> bool:
        """Whether ``candidate`` is the secret, in time that depends on neither."""
        return hmac.compare_digest(_digest(candidate), self._digest)

    def authenticate(self, header: str | None) -> Peer:
        """The peer an ``Authorization`` header proves, or Unauthorized (401) with a
        ``reason``: ``missing``, ``malformed`` or ``bad_secret``; the refusal is logged as a
        ``peer.refused`` event, the secret never."""
        if not is_peer_authorization(header):
            raise _refused("missing", "a peer request needs the region's node credentials")
        assert header is not None
        _, _, credentials = header.partition(" ")
        node_id, colon, candidate = credentials.strip().partition(":")
        try:
            check_node_id(node_id)
        except ValueError:
            colon = ""
        if not colon or not candidate:
            raise _refused("malformed", "malformed peer credentials")
        if not self.matches(candidate):
            raise _refused("bad_secret", "the region secret does not match", node_id=node_id)
        return Peer(node_id=node_id)


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def _refused(reason: str, message: str, *, node_id: str | None = None) -> Unauthorized:
    emit("peer.refused", level=logging.WARNING, reason=reason, node_id=node_id)
    return Unauthorized(message, reason=reason)
