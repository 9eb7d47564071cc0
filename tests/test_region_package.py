"""The region package's public names, key layout and errors: a contract the node is wired to."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

import cache_node.region as region
from cache_node.errors import Conflict, InvalidInput, Overloaded, WeightCacheError
from cache_node.region import (
    FlightTimeout,
    LeaseLost,
    RegionError,
    RegionKeys,
    RegionUnavailable,
)
from cache_node.settings import NodeSettings, RegionSettings


def test_exported_members() -> None:
    assert sorted(region.__all__) == [
        "BlobLocations",
        "DEFAULT_REPLICAS",
        "FlightResult",
        "FlightTimeout",
        "Lease",
        "LeaseLost",
        "MIN_SECRET_LENGTH",
        "Membership",
        "NodeRecord",
        "NodeReport",
        "NodeState",
        "PEER_SCHEME",
        "Peer",
        "REGION_UNREACHABLE",
        "RegionError",
        "RegionFlight",
        "RegionKeys",
        "RegionSecret",
        "RegionUnavailable",
        "RejoinReason",
        "Work",
        "check_blob",
        "check_node_id",
        "is_peer_authorization",
        "live_nodes",
        "open_redis",
        "owners",
        "rank",
        "redis_errors",
        "score",
    ]
    for name in region.__all__:
        assert hasattr(region, name)


def test_keys_are_namespaced_by_region_under_one_hash_tag() -> None:
    keys = RegionKeys("eu-1")
    sha = "a" * 64
    assert keys.node("n1") == "weightcache:{eu-1}:node:n1"
    assert keys.nodes == "weightcache:{eu-1}:nodes"
    assert keys.held("n1") == "weightcache:{eu-1}:held:n1"
    assert keys.holders == "weightcache:{eu-1}:holders"
    assert keys.blob(sha) == f"weightcache:{{eu-1}}:blob:{sha}"
    assert keys.fence == "weightcache:{eu-1}:fence"
    assert keys.lease("k") == "weightcache:{eu-1}:lease:k"
    assert keys.result("k") == "weightcache:{eu-1}:result:k"
    assert keys.channel("k") == "weightcache:{eu-1}:flight:k"
    assert RegionKeys("us-2").node("n1") != keys.node("n1")
    for bad in ("", "eu 1", "eu{1}", "a" * 65, "-eu", "eu:1"):
        with pytest.raises(InvalidInput):
            RegionKeys(bad)
    for bad_key in ("", "k k", "{k}", "k\n"):
        with pytest.raises(InvalidInput):
            keys.lease(bad_key)


def test_errors_sit_in_the_nodes_tree_with_their_codes() -> None:
    down = RegionUnavailable("redis is away")
    assert isinstance(down, RegionError)
    assert isinstance(down, Overloaded)
    assert (down.code, down.http_status, down.retry_after_s) == ("region_unreachable", 503, 1.0)
    assert (RegionError("x").code, RegionError("x").http_status) == ("region_error", 502)
    assert isinstance(LeaseLost("x"), Conflict)
    assert (LeaseLost("x").code, LeaseLost("x").http_status) == ("lease_lost", 409)
    waited = FlightTimeout("x", retry_after_s=2)
    assert isinstance(waited, Overloaded)
    assert (waited.code, waited.http_status) == ("flight_timeout", 503)
    for error in (down, LeaseLost("x"), waited):
        assert isinstance(error, WeightCacheError)


def test_region_settings_come_from_the_environment_and_are_checked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WEIGHTCACHE_REGION", "eu-1")
    monkeypatch.setenv("WEIGHTCACHE_REGION_SECRET", "x" * 40)
    monkeypatch.setenv("WEIGHTCACHE_REGION_ADVERTISE_URL", "http://node-a:8470")
    settings = NodeSettings()
    assert settings.region == "eu-1"
    assert settings.regional.secret is not None
    assert settings.regional.secret.get_secret_value() == "x" * 40
    assert "x" * 40 not in repr(settings)
    assert settings.regional.advertise_url == "http://node-a:8470"
    assert settings.regional.replicas == 2
    with pytest.raises(ValidationError, match="at most half"):
        RegionSettings(heartbeat_interval_s=6, heartbeat_ttl_s=10)
