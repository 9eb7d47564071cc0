"""The registry's indexes agree with a scan of its records, whatever the sequence of writes."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from api.schema import ModelSpec, PipelineSpec
from cache_node.metadata import DiskcacheKeyValue
from cache_node.registry import FileEntry, ModelEntry, PipelineRecord, Registry

BLOBS = [f"{i:02x}" * 32 for i in range(6)]
SPEC = PipelineSpec(models=[ModelSpec(name="m", source="file:///x")])


def _record(tenant: str, pipeline: str, blobs: list[str]) -> PipelineRecord:
    files = [FileEntry(path=f"f{i}", size=1, blob=b) for i, b in enumerate(blobs)]
    return PipelineRecord(id=pipeline, tenant=tenant, spec=SPEC,
                          models=[ModelEntry(name="m", source="file:///x", files=files)])


def _scan(registry: Registry, sha256: str) -> set[str]:
    return {r.tenant for r in registry.all() if sha256 in r.blobs()}


_ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "put", "delete"]),
        st.sampled_from(["alpha", "beta", "alpha/x"]),  # a tenant whose name holds a slash
        st.sampled_from(["p", "q"]),
        st.lists(st.sampled_from(BLOBS), max_size=3),
    ),
    max_size=25,
)


@settings(max_examples=40, deadline=None)
@given(ops=_ops)
def test_blob_index_matches_a_scan(ops: list[tuple[str, str, str, list[str]]]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        meta = DiskcacheKeyValue(Path(tmp))
        try:
            registry = Registry(meta)
            for op, tenant, pipeline, blobs in ops:
                if op == "put":
                    registry.put(_record(tenant, pipeline, blobs))
                else:
                    registry.delete(tenant, pipeline)
                for sha256 in BLOBS:
                    assert registry.blob_tenants(sha256) == _scan(registry, sha256)
            for tenant in ("alpha", "beta", "alpha/x"):
                assert {r.key for r in registry.of_tenant(tenant)} == {
                    r.key for r in registry.all() if r.tenant == tenant
                }
        finally:
            meta.close()


def test_indexes_are_built_for_a_data_dir_written_before_them(tmp_path: Path) -> None:
    meta = DiskcacheKeyValue(tmp_path)
    try:
        old = _record("alpha", "p", BLOBS[:2])
        meta.set(f"pipeline:{old.key}", old.model_dump(mode="json"))  # as an older node did
        registry = Registry(meta)
        lease = registry.create_lease("alpha", "p", ttl_s=60)
        meta.delete("lease-index:alpha/p")
        meta.delete("tenant-leases:alpha")
        assert registry.blob_tenants(BLOBS[0]) == set()
        assert registry.ensure_indexes() is True
        assert registry.blob_tenants(BLOBS[0]) == {"alpha"}
        assert registry.leases_of("alpha", "p") == 1
        assert registry.ensure_indexes() is False  # once per data dir
        registry.delete_lease(lease.lease_id)
        assert registry.leases_of("alpha", "p") == 0
    finally:
        meta.close()


def test_lease_index_counts_live_leases_only(tmp_path: Path) -> None:
    meta = DiskcacheKeyValue(tmp_path)
    try:
        registry = Registry(meta)
        short = registry.create_lease("alpha", "p", ttl_s=0.01)
        kept = registry.create_lease("alpha", "p", ttl_s=60)
        registry.create_lease("alpha", "q", ttl_s=60)
        now = short.expires_at + 1
        assert registry.leases_of("alpha", "p", now=now) == 1
        assert registry.active_leases(now=now) == {"alpha/p": 1, "alpha/q": 1}
        registry.delete_lease(kept.lease_id)
        assert registry.leases_of("alpha", "p", now=now) == 0
        assert registry.leases_of("alpha", "q", now=now) == 1
    finally:
        meta.close()
