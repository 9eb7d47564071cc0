"""The region's catalogue of pipelines: what is registered, by tenant and id, on Redis.

Registering (or deleting) a pipeline on any node writes the catalogue; every node reconciles
its own registry with it (``cache_node.region.node_region``), so registering on one node warms
the region. Each write takes the next value of the region's ``catalogue-gen`` counter, so a
node can tell which of two writes is newer, and publishes a nudge on the ``catalogue``
channel so the others reconcile at once instead of on their next periodic pass.

A deletion stays in the catalogue as a tombstone (``deleted``): a node that still has the
pipeline deletes it, and one that never saw the deletion (it was down) does not re-publish
it as a pipeline of its own. Nodes also remember the deletions they made or applied, with
when (``at``): after Redis restarted empty, a node that missed a deletion writes its copy back,
and a node that remembers the deletion writes the tombstone over it (it is newer). Eviction is
per node and never written here.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from api.schema import PipelineSpec
from cache_node.events import emit
from cache_node.region.connection import redis_errors
from cache_node.region.keys import RegionKeys

__all__ = ["CatalogueEntry", "PipelineCatalogue"]

# KEYS: the catalogue hash, the generation counter. ARGV: field, entry JSON object without its
# generation (the script splices it in as the first member, leaving the rest byte for byte:
# a decode and encode by cjson would turn an empty list into an object), channel. One step:
# the generation and the write agree.
_PUT = """
local gen = redis.call('INCR', KEYS[2])
local entry = '{"generation":' .. string.format('%d', gen) .. ',' .. string.sub(ARGV[2], 2)
redis.call('HSET', KEYS[1], ARGV[1], entry)
redis.call('PUBLISH', ARGV[3], ARGV[1])
return gen
"""


class CatalogueEntry(BaseModel):
    """One pipeline of the catalogue; ``spec`` is None for a deletion (a tombstone)."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    tenant: str
    id: str
    spec: PipelineSpec | None = None
    generation: int = 0
    node_id: str = ""  # the node that wrote it (for people)
    #: When the change was made (the node's clock): a deletion a node remembers outranks an
    #: older registration written back by a node that missed it (Redis restarted empty).
    at: float = 0.0

    @property
    def deleted(self) -> bool:
        return self.spec is None

    @property
    def field(self) -> str:
        return catalogue_field(self.tenant, self.id)


def catalogue_field(tenant: str, pipeline_id: str) -> str:
    """The hash field of a pipeline. Pipeline ids are allow-listed (no slash), so the last
    slash separates them from a tenant name that may hold one."""
    return f"{tenant}/{pipeline_id}"


class PipelineCatalogue:
    """The catalogue of one region (see the module docstring)."""

    def __init__(self, redis: Redis, *, region: str, node_id: str) -> None:
        self.keys = RegionKeys(region)
        self.node_id = node_id
        self._redis = redis
        self._put_script = redis.register_script(_PUT)

    async def put(
        self, tenant: str, pipeline_id: str, spec: PipelineSpec | None, *, at: float
    ) -> int:
        """Write a registration (or, with ``spec`` None, a deletion) made at ``at``; its
        generation."""
        entry = CatalogueEntry(tenant=tenant, id=pipeline_id, spec=spec, node_id=self.node_id,
                               at=at)
        payload = entry.model_dump_json(exclude={"generation"})
        with redis_errors("writing the pipeline catalogue"):
            generation = await self._put_script(
                keys=[self.keys.pipelines, self.keys.catalogue_gen],
                args=[entry.field, payload, self.keys.catalogue_channel],
            )
        return int(generation)

    async def entries(self) -> dict[str, CatalogueEntry]:
        """Every entry, tombstones included, by field."""
        with redis_errors("reading the pipeline catalogue"):
            raw = await self._redis.hgetall(self.keys.pipelines)
        entries: dict[str, CatalogueEntry] = {}
        for field, value in raw.items():
            try:
                entry = CatalogueEntry.model_validate_json(value)
            except ValidationError:
                emit("region.bad_catalogue_entry", field=str(field))
                continue
            entries[entry.field] = entry
        return entries
