"""schemathesis over the node's OpenAPI schema: no generated request gets a server error."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import schemathesis
from hypothesis import HealthCheck, settings

from api import create_app
from cache_node.settings import NodeSettings
from tests.fixtures.node_server import RunningNode, running_node

if TYPE_CHECKING:
    # schemathesis names the case type of an OpenAPI schema for type checkers only
    from schemathesis.specs.openapi.schemas import OpenApiCase

_SCHEMA = create_app(NodeSettings(data_dir=Path(tempfile.mkdtemp()))).openapi()
schema = schemathesis.openapi.from_dict(_SCHEMA)


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "models").mkdir()
    with running_node(data_dir=root / "data", local_roots=[root / "models"]) as running:
        yield running


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
def test_no_server_errors(case: OpenApiCase, node: RunningNode) -> None:
    response = case.call(base_url=node.url, timeout=30)
    assert response.status_code < 500, (case.method, case.formatted_path, response.text)
