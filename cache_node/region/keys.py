"""The Redis key layout of a region, in one place, and the identifiers allowed in it.

Every key of region ``R`` starts with ``weightcache:{R}:``. The braces are a Redis Cluster hash
tag: all of a region's keys hash to one slot, so the Lua scripts of this package may touch
several of them (a script on keys of different slots is refused by a cluster), and a plain
Redis or Valkey ignores them.

==================================  ======  ==============================================
key (after the prefix)              type    what
==================================  ======  ==============================================
``nodes``                           set     node ids that wrote a membership record
``node:<node_id>``                  string  the node's record (JSON), expiring by TTL
``held:<node_id>``                  set     blobs (sha256) the node holds
``holders``                         set     node ids that have a ``held:`` set
``blob:<sha256>``                   set     node ids holding the blob
``fence``                           string  the region's fencing counter (INCR)
``lease:<flight key>``              string  ``<token>:<lease id>:<node id>``, expiring by TTL
``result:<flight key>``             string  a flight's outcome (JSON), kept briefly
``flight:<flight key>``             channel published to when a flight ends
``objects``                         hash    transfer key → sha256 of a committed blob
``pipelines``                       hash    ``<tenant>/<id>`` → catalogue entry (JSON)
``catalogue-gen``                   string  the catalogue's generation counter (INCR)
``catalogue``                       channel published to when the catalogue changes
==================================  ======  ==============================================
"""

from __future__ import annotations

import re

from cache_node.errors import InvalidInput

__all__ = ["RegionKeys", "check_blob", "check_node_id"]

# Allow-lists (I8): these names become parts of Redis keys and of log lines, so nothing that
# could break out of a key (braces move the hash tag, spaces and colons split fields).
_REGION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_NODE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_BLOB = re.compile(r"[0-9a-f]{64}")
_FLIGHT_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/=-]{0,199}")


def check_node_id(node_id: str) -> str:
    """``node_id`` if it is a valid node id, else InvalidInput."""
    if not _NODE_ID.fullmatch(node_id):
        raise InvalidInput(f"invalid node id {node_id!r}", field="node_id")
    return node_id


def check_blob(sha256: str) -> str:
    """``sha256`` if it is a blob digest (64 lowercase hex digits), else InvalidInput."""
    if not _BLOB.fullmatch(sha256):
        raise InvalidInput(f"invalid blob digest {sha256!r}", field="blob")
    return sha256


class RegionKeys:
    """The names of one region's keys (see the module docstring)."""

    def __init__(self, region: str) -> None:
        if not _REGION.fullmatch(region):
            raise InvalidInput(f"invalid region name {region!r}", field="region")
        self.region = region
        self.prefix = f"weightcache:{{{region}}}:"

    @property
    def nodes(self) -> str:
        return f"{self.prefix}nodes"

    def node(self, node_id: str) -> str:
        return f"{self.prefix}node:{check_node_id(node_id)}"

    def held(self, node_id: str) -> str:
        return f"{self.prefix}held:{check_node_id(node_id)}"

    @property
    def holders(self) -> str:
        return f"{self.prefix}holders"

    @property
    def blob_prefix(self) -> str:
        """What ``blob(sha256)`` puts before the digest (for scripts that build the keys)."""
        return f"{self.prefix}blob:"

    def blob(self, sha256: str) -> str:
        return f"{self.blob_prefix}{check_blob(sha256)}"

    @property
    def fence(self) -> str:
        return f"{self.prefix}fence"

    @property
    def objects(self) -> str:
        return f"{self.prefix}objects"

    @property
    def pipelines(self) -> str:
        return f"{self.prefix}pipelines"

    @property
    def catalogue_gen(self) -> str:
        return f"{self.prefix}catalogue-gen"

    @property
    def catalogue_channel(self) -> str:
        return f"{self.prefix}catalogue"

    def lease(self, key: str) -> str:
        return f"{self.prefix}lease:{_flight_key(key)}"

    def result(self, key: str) -> str:
        return f"{self.prefix}result:{_flight_key(key)}"

    def channel(self, key: str) -> str:
        return f"{self.prefix}flight:{_flight_key(key)}"


def _flight_key(key: str) -> str:
    if not _FLIGHT_KEY.fullmatch(key):
        raise InvalidInput(f"invalid flight key {key!r}", field="key")
    return key
