"""The dashboard acts, in a real browser (headless Debian Chromium) against a real node.

Pin, unpin, warm now, evict and delete go through the node's HTTP API as the tenant whose token
the page holds (in the tab's session storage), and each test checks the node's state over the
API afterwards, not the page's word for it. Evict and delete ask first, naming the pipeline.
Without a token on a node that needs one, the page shows the node's refusal (its code and
message) and offers nothing to act on; on an open node it needs no token at all. A failed
pipeline says whether a retry is coming, and "Fills in flight" counts fills running now, not
the partial files a crash or a failure left behind.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from playwright.sync_api import Browser, ConsoleMessage, Locator, Page

from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.weights import safetensors_bytes, write_weights

TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}
KiB = 1024
MiB = 1024 * KiB
CONFIG = b'{"model_type": "llama"}'


# ---------------------------------------------------------------------- helpers


def _local(root: Path, name: str, *, nbytes: int = 64 * KiB) -> dict[str, Any]:
    write_weights(root / name, nbytes=nbytes)
    (root / name / "config.json").write_bytes(CONFIG)
    return {"models": [{"name": "m", "source": f"file://{root / name}"}]}


def _register_warm(client: httpx.Client, pipeline_id: str, body: dict[str, Any]) -> None:
    answer = client.put(f"/v1/pipelines/{pipeline_id}", json=body)
    assert answer.status_code == 202, answer.text
    assert wait_for_state(client, pipeline_id, {"warm", "failed"})["state"] == "warm"


def _until(condition: Callable[[], bool], what: str, *, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def _status(client: httpx.Client, pipeline_id: str) -> dict[str, Any]:
    answer = client.get(f"/v1/pipelines/{pipeline_id}")
    assert answer.status_code == 200, answer.text
    status: dict[str, Any] = answer.json()
    return status


@contextmanager
def _page(browser: Browser, url: str, *, expected: tuple[str, ...] = ()) -> Iterator[Page]:
    """A page in a fresh context (its own session storage); no script or console errors
    besides the HTTP refusals a test provokes on purpose (``expected`` status codes)."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    page = context.new_page()
    errors: list[str] = []

    def keep(message: ConsoleMessage) -> None:
        if message.type == "error" and not any(code in message.text for code in expected):
            errors.append(message.text)

    page.on("console", keep)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.goto(url + "/")
    try:
        yield page
    finally:
        context.close()
    assert errors == []


def _give_token(page: Page, token: str) -> None:
    page.locator("#token-dialog[open]").wait_for()
    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")


def _card(page: Page, pipeline_id: str) -> Locator:
    return page.locator(f'.card[data-pipeline="{pipeline_id}"]')


def _act(page: Page, pipeline_id: str, verb: str) -> None:
    _card(page, pipeline_id).locator(f'button[data-action="{verb}"]:enabled').click()


def _confirm_dialog(page: Page, pipeline_id: str) -> Locator:
    dialog = page.locator("#confirm-dialog[open]")
    dialog.wait_for()
    assert pipeline_id in dialog.locator("#confirm-title").inner_text()
    assert pipeline_id in dialog.locator("#confirm-text").inner_text()
    return dialog


# ---------------------------------------------------------------------- with a tenant's token


def test_actions_change_the_node_for_the_tokens_tenant_only(
    tmp_path: Path, browser: Browser
) -> None:
    models = tmp_path / "models"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    with running_node(
        data_dir=tmp_path / "data", capacity="64MiB", tokens_file=tokens, local_roots=[models]
    ) as node, node.client("tok-a") as a, node.client("tok-b") as b:
        for name in ("chat", "ranker", "scratch"):
            _register_warm(a, name, _local(models, name))
        # team-b holds a pipeline of the same id, and one of its own: neither may be touched
        _register_warm(b, "chat", _local(models, "b-chat"))
        _register_warm(b, "b-secret", _local(models, "b-secret"))
        b_before = {p["id"]: p for p in b.get("/v1/pipelines").json()["pipelines"]}

        with _page(browser, node.url, expected=("401", "409")) as page:
            _give_token(page, "tok-a")
            _card(page, "scratch").wait_for()
            assert page.evaluate("sessionStorage.getItem('weightcache.token')") == "tok-a"
            assert page.evaluate("localStorage.getItem('weightcache.token')") is None
            cards = page.locator(".card").evaluate_all("all => all.map(c => c.dataset.pipeline)")
            assert sorted(cards) == ["chat", "ranker", "scratch"]
            assert "b-secret" not in page.content()
            assert "team-b" not in page.content()

            # pin, then unpin: in place, the node's state says so
            _act(page, "chat", "pin")
            _until(lambda: _status(a, "chat")["pinned"], "pin did not reach the node")
            _card(page, "chat").locator(".badge.pinned").wait_for()
            assert _status(a, "chat")["state"] == "warm"
            _act(page, "chat", "unpin")
            _until(lambda: not _status(a, "chat")["pinned"], "unpin did not reach the node")
            _card(page, "chat").locator('button[data-action="pin"]').wait_for()

            # evict asks first, naming the pipeline; confirmed, the node evicts it
            _act(page, "chat", "evict")
            _confirm_dialog(page, "chat").locator("#confirm-ok").click()
            assert wait_for_state(a, "chat", {"evicted"})["state"] == "evicted"
            _card(page, "chat").locator('.chip[data-state="evicted"]').wait_for()

            # warm now brings it back
            _act(page, "chat", "warm")
            assert wait_for_state(a, "chat", {"warm", "failed"})["state"] == "warm"
            _card(page, "chat").locator('.chip[data-state="warm"]').wait_for()

            # delete, cancelled: nothing happens (the next action proves nothing was sent)
            _act(page, "scratch", "delete")
            _confirm_dialog(page, "scratch").locator("#confirm-cancel").click()
            page.locator("#confirm-dialog[open]").wait_for(state="detached")
            _act(page, "ranker", "pin")
            _until(lambda: _status(a, "ranker")["pinned"], "pin did not reach the node")
            assert _status(a, "scratch")["state"] == "warm"
            assert _card(page, "scratch").count() == 1
            # ... Escape cancels too
            _act(page, "scratch", "delete")
            _confirm_dialog(page, "scratch")
            page.keyboard.press("Escape")
            page.locator("#confirm-dialog[open]").wait_for(state="detached")
            _act(page, "ranker", "unpin")
            _until(lambda: not _status(a, "ranker")["pinned"], "unpin did not reach the node")
            assert _status(a, "scratch")["state"] == "warm"

            # delete, confirmed: gone from the node and from the page
            _act(page, "scratch", "delete")
            _confirm_dialog(page, "scratch").locator("#confirm-ok").click()
            _until(lambda: a.get("/v1/pipelines/scratch").status_code == 404,
                   "delete did not reach the node")
            _card(page, "scratch").wait_for(state="detached")

            # refused by the node (a replica holds a lease): its code and message, on the card
            assert a.post("/v1/pipelines/ranker/leases").status_code == 201
            refusal = a.post("/v1/pipelines/ranker/evict")  # what the node answers, unchanged
            assert refusal.status_code == 409
            _act(page, "ranker", "evict")
            _confirm_dialog(page, "ranker").locator("#confirm-ok").click()
            shown = _card(page, "ranker").locator(".action-error")
            shown.wait_for()
            assert shown.locator(".error-code").inner_text() == refusal.json()["error"]["code"]
            assert shown.locator(".error-message").inner_text() == (
                refusal.json()["error"]["message"]
            )
            assert "409" in shown.locator(".error-title").inner_text()
            page.wait_for_timeout(1500)  # it outlives the page's next polls
            assert shown.is_visible()
            assert _status(a, "ranker")["state"] == "warm"
            shown.locator("button[data-dismiss]").click()
            shown.wait_for(state="detached")

        # team-b's pipelines, one of them named like team-a's, were never touched
        b_after = {p["id"]: p for p in b.get("/v1/pipelines").json()["pipelines"]}
        assert b_after.keys() == b_before.keys()
        for pipeline_id, status in b_after.items():
            assert status["state"] == "warm"
            assert status["pinned"] is False
            assert status["registered_at"] == b_before[pipeline_id]["registered_at"]


# ---------------------------------------------------------------------- without a token


def test_without_a_token_the_node_refuses_and_the_page_shows_why(
    tmp_path: Path, browser: Browser
) -> None:
    models = tmp_path / "models"
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    with running_node(
        data_dir=tmp_path / "data", capacity="64MiB", tokens_file=tokens, local_roots=[models]
    ) as node, node.client("tok-a") as a:
        _register_warm(a, "chat", _local(models, "chat"))
        before = _status(a, "chat")
        anonymous = httpx.get(f"{node.url}/v1/pipelines")
        assert anonymous.status_code == 401
        wrong = httpx.get(f"{node.url}/v1/pipelines", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401

        with _page(browser, node.url, expected=("401",)) as page:
            page.locator("#token-dialog[open]").wait_for()
            page.click("#token-cancel")
            banner = page.locator("#banner")
            banner.wait_for()
            assert page.locator("#banner-code").inner_text() == (
                f"{anonymous.json()['error']['code']} (HTTP 401)"
            )
            assert page.locator("#banner-message").inner_text() == (
                anonymous.json()["error"]["message"]
            )
            assert "needs a token" in page.locator("#banner-title").inner_text()
            assert page.locator(".card").count() == 0
            assert page.locator("button[data-action]").count() == 0  # nothing to act on
            assert page.locator("#empty").is_hidden()

            # a token the node does not know: refused the same way, and said so
            page.click("#banner-token")
            _give_token(page, "nope")
            _until(lambda: "did not accept" in page.locator("#banner-title").inner_text(),
                   "the refusal of a bad token is not shown")
            assert page.locator("#banner-message").inner_text() == wrong.json()["error"]["message"]
            assert page.locator(".card").count() == 0
            page.click("#token-cancel")

            # the tenant's token: the banner goes, the actions come
            page.click("#banner-token")
            _give_token(page, "tok-a")
            _card(page, "chat").locator('button[data-action="evict"]:enabled').wait_for()
            assert banner.is_hidden()

            # forgotten: nothing of the tenant stays on the page
            page.click("#token-button")
            page.click("#token-clear")
            banner.wait_for()
            assert page.locator(".card").count() == 0
            assert page.evaluate("sessionStorage.getItem('weightcache.token')") is None
            for figure in ("#st-warm", "#st-leases", "#st-used", "#st-inflight"):
                assert page.locator(figure).inner_text() == "–", figure  # nothing left over

        after = _status(a, "chat")
        assert (after["state"], after["pinned"]) == (before["state"], before["pinned"])


def test_an_open_node_needs_no_token(tmp_path: Path, browser: Browser) -> None:
    models = tmp_path / "models"
    with running_node(
        data_dir=tmp_path / "data", capacity="64MiB", local_roots=[models]
    ) as node, node.client() as c:
        _register_warm(c, "chat", _local(models, "chat"))
        with _page(browser, node.url) as page:
            _card(page, "chat").wait_for()
            assert page.locator("#token-dialog[open]").count() == 0
            assert page.locator("#banner").is_hidden()
            _act(page, "chat", "pin")
            _until(lambda: _status(c, "chat")["pinned"], "pin did not reach the node")
            _act(page, "chat", "unpin")
            _until(lambda: not _status(c, "chat")["pinned"], "unpin did not reach the node")
            _act(page, "chat", "evict")
            _confirm_dialog(page, "chat").locator("#confirm-ok").click()
            assert wait_for_state(c, "chat", {"evicted"})["state"] == "evicted"
            _card(page, "chat").locator('button[data-action="warm"]').wait_for()
            _act(page, "chat", "warm")
            assert wait_for_state(c, "chat", {"warm", "failed"})["state"] == "warm"
            assert page.evaluate("sessionStorage.getItem('weightcache.token')") is None


# ---------------------------------------------------------------------- failures, retries, fills


def _failures_node(tmp_path: Path, hub: FixtureHub, *, retries: bool) -> Any:
    return running_node(
        data_dir=tmp_path / "data",
        capacity="64MiB",
        hf={"endpoint": hub.endpoint},
        fetch={"max_attempts": 1},
        retry={"enabled": retries, "base_s": 600},
    )


def _bytes_shown(page: Page, stat: str) -> int:
    return int(page.locator(f"#{stat}").get_attribute("data-bytes") or "-1")


def test_failed_pipelines_say_what_happens_next_and_fills_in_flight_are_fills(
    tmp_path: Path, browser: Browser
) -> None:
    data = tmp_path / "data"
    (data / "tmp").mkdir(parents=True)
    # a transfer a crash left behind: kept to resume, but no fill is running it
    (data / "tmp" / f"{'cd' * 32}.partial").write_bytes(b"\1" * 256 * KiB)
    with FixtureHub(stall_s=3.0) as hub:
        hub.add_repo("acme/down", {"model-fault-500.safetensors": safetensors_bytes(4 * KiB),
                                   "config.json": CONFIG})
        hub.add_repo("acme/slow", {"model-fault-stall.safetensors": safetensors_bytes(6 * MiB),
                                   "config.json": CONFIG})
        with _failures_node(tmp_path, hub, retries=True) as node, node.client() as c:
            c.put("/v1/pipelines/flaky", json={"models": [{"name": "m", "source": "hf://acme/down"}]})
            c.put("/v1/pipelines/gone", json={"models": [{"name": "m", "source": "hf://acme/gone"}]})
            flaky = wait_for_state(c, "flaky", {"failed", "warm"})
            gone = wait_for_state(c, "gone", {"failed", "warm"})
            assert flaky["state"] == gone["state"] == "failed"
            assert flaky["error"]["retry_at"] is not None  # transient: a retry is scheduled
            assert gone["error"]["retry_at"] is None  # permanent: nobody retries it
            assert gone["models"][0]["files"] == 0  # it never resolved

            with _page(browser, node.url) as page:
                flaky_card, gone_card = _card(page, "flaky"), _card(page, "gone")
                gone_card.wait_for()
                retry = flaky_card.locator(".error-retry")
                assert retry.inner_text().startswith("retries in 10 min (")
                retry_at = float(retry.get_attribute("data-retry-at") or 0)
                assert retry_at == flaky["error"]["retry_at"]
                no_retry = gone_card.locator(".error-retry")
                assert no_retry.get_attribute("data-retry-at") is None
                assert no_retry.inner_text() == f"no automatic retry: {gone['error']['action']}"
                assert gone_card.locator(".model-size").inner_text() == "not resolved"
                assert "resolving" not in gone_card.inner_text()

                # only the leftover and the failed transfer's partial are on disk: no fill runs
                temp = c.get("/v1/node").json()["temp"]
                assert temp >= 256 * KiB
                _until(lambda: _bytes_shown(page, "st-partials") == temp, "partials not shown")
                assert _bytes_shown(page, "st-inflight") == 0

                # a fill stalls halfway for 3 s: what it wrote so far is in flight
                c.put("/v1/pipelines/slow",
                      json={"models": [{"name": "m", "source": "hf://acme/slow"}]})
                _until(lambda: _bytes_shown(page, "st-inflight") > 0, "no fill in flight shown")
                assert _bytes_shown(page, "st-partials") == temp
                assert wait_for_state(c, "slow", {"warm", "failed"})["state"] == "warm"
                _until(lambda: _bytes_shown(page, "st-inflight") == 0, "the fill stayed shown")

        # the same failure on a node restarted with retries off: no retry time, and how to retry
        with _failures_node(tmp_path, hub, retries=False) as node, node.client() as c:
            error = _status(c, "flaky")["error"]
            assert error["retry_at"] is None
            with _page(browser, node.url) as page:
                shown = _card(page, "flaky").locator(".error-retry")
                shown.wait_for()
                assert shown.get_attribute("data-retry-at") is None
                assert shown.inner_text() == f"no automatic retry: {error['action']}"
                assert "automatic retries are off" in shown.inner_text()
