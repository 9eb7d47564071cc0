"""The dashboard's region panel in a real browser: shown on a node of a region with its
nodes and the copies of each pipeline, hidden on a node on its own."""

from __future__ import annotations

from pathlib import Path

from playwright.sync_api import Browser

from tests.fixtures.node_server import running_node
from tests.fixtures.redis_server import RedisServer
from tests.fixtures.region_nodes import local_model, local_spec, region_nodes, wait_state


def test_the_region_panel_shows_the_nodes_and_copies(
    tmp_path: Path, redis_server: RedisServer, browser: Browser
) -> None:
    local_model(tmp_path, 4096)
    with region_nodes(redis_server.url, tmp_path, 2) as (_, nodes):
        with nodes[0].client() as c:
            c.put("/v1/pipelines/p", json=local_spec(tmp_path))
        for node in nodes:
            wait_state(node, "p", "warm")
        page = browser.new_page()
        page.goto(nodes[1].url + "/")
        page.locator("#region-panel:not([hidden])").wait_for()
        page.wait_for_function(
            "document.querySelectorAll('#region-nodes tr').length === 2"
            " && document.getElementById('region-copies').textContent.includes('p ×2')",
            timeout=10_000,
        )
        assert "r1" in page.locator("#region-note").inner_text()
        page.close()

    with running_node(data_dir=tmp_path / "alone") as alone:
        page = browser.new_page()
        page.goto(alone.url + "/")
        page.locator("#node-id", has_text="-").wait_for()
        page.wait_for_timeout(300)
        assert page.locator("#region-panel").is_hidden()
        page.close()
