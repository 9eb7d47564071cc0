"""What a node writes to disk does not change behind its back.

The registry's records embed some API types (the registered spec, a failure's error). A change
to those wire models would silently change the stored format, and an upgraded node could then
misread what an older one wrote. The stored format is pinned here: a change to it fails this
test, and whoever makes it updates the pinned schema on purpose (with a migration when old
records no longer load), rather than by accident.
"""

from __future__ import annotations

import json
from pathlib import Path

from cache_node.registry import LeaseRecord, PipelineRecord

PINNED = Path(__file__).parent / "fixtures" / "registry_format.json"

# A record as a node of the pinned format writes it: every later version must still read it.
_WRITTEN = {
    "id": "chat",
    "tenant": "team-a",
    "spec": {"models": [{"name": "llm", "source": "hf://org/model"}], "tp_sizes": [1, 2]},
    "state": "warm",
    "models": [
        {
            "name": "llm",
            "source": "hf://org/model",
            "revision": "0123456789abcdef0123456789abcdef01234567",
            "files": [
                {"path": "model.safetensors", "size": 10, "sha256": "ab" * 32,
                 "blob": "ab" * 32, "verified": True},
            ],
        }
    ],
    "shards": {"1": {"tp_size": 1, "state": "ready", "mode": "full"}},
    "error": None,
    "registered_at": 1.0,
    "generation": 3,
}


def _stored_schema() -> dict[str, object]:
    return {
        "pipeline_record": PipelineRecord.model_json_schema(mode="serialization"),
        "lease_record": LeaseRecord.model_json_schema(mode="serialization"),
    }


def test_the_stored_format_is_the_pinned_one() -> None:
    pinned = json.loads(PINNED.read_text())
    assert _stored_schema() == pinned, (
        "the registry's stored format changed (did a wire model in api.schema change?): "
        f"if on purpose, rewrite {PINNED.name} and make old records load"
    )


def test_a_record_of_the_pinned_format_loads_and_writes_back_the_same() -> None:
    record = PipelineRecord.model_validate(_WRITTEN)
    assert record.models[0].files[0].blob == "ab" * 32
    again = PipelineRecord.model_validate(json.loads(json.dumps(record.model_dump(mode="json"))))
    assert again == record
