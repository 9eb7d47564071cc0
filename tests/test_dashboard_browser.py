"""The dashboard in a real browser (headless Debian Chromium) against a real node.

Tenant ``team-a`` has a warm pipeline (a local directory, with real loads reported), a warming
one (a hub that stalls every file halfway, so its progress moves in steps) and a failed one (a hub
that answers 500); tenant ``team-b`` has a pipeline that must not show on ``team-a``'s page.
The page asks for a token, then shows the right chips, a progress bar that moves and the failure
reason, and a screenshot is saved to ``test-artifacts/dashboard.png``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import torch
from playwright.sync_api import Browser, ConsoleMessage, Page

from api.schema import CaptureKey
from loader.captures import CaptureClient, CapturePayload
from loader.loading import load
from tests.fixtures.hf_hub import FixtureHub
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama
from tests.fixtures.weights import safetensors_bytes

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
TOKENS = {"tok-a": "team-a", "tok-b": "team-b"}
KiB = 1024
STALLED_FILES = 16
STALL_S = 1.5


def _hub_repos(hub: FixtureHub) -> None:
    # Every file of the ASR model stalls halfway through its first GET for STALL_S seconds:
    # four files fill at a time, so the pipeline warms in steps over several seconds.
    asr = {
        f"model-{i:02d}-fault-stall.safetensors": safetensors_bytes(192 * KiB)
        for i in range(STALLED_FILES)
    }
    asr["config.json"] = json.dumps({"model_type": "whisper"}).encode()
    hub.add_repo("acme/whisper-tiny", asr)
    hub.add_repo(
        "acme/tts-tiny",
        {
            "model.safetensors": safetensors_bytes(256 * KiB),
            "config.json": b'{"model_type": "vits"}',
        },
    )
    hub.add_repo(
        "acme/summarizer",
        {"model-fault-500.safetensors": safetensors_bytes(64 * KiB), "config.json": b"{}"},
    )


def _start_node(tmp_path: Path, hub: FixtureHub) -> Any:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(json.dumps(TOKENS))
    return running_node(
        data_dir=tmp_path / "data",
        capacity="256MiB",
        region="eu-west",
        node_id="cache-eu-west-1a",
        tokens_file=tokens,
        local_roots=[tmp_path / "models"],
        hf={"endpoint": hub.endpoint},
        fetch={"max_attempts": 2, "backoff_base_s": 0.05, "backoff_cap_s": 0.1},
        eviction={"high_watermark": 0.9, "low_watermark": 0.8},
    )


def _register(client: httpx.Client, pipeline_id: str, body: dict[str, Any]) -> None:
    answer = client.put(f"/v1/pipelines/{pipeline_id}", json=body)
    assert answer.status_code == 202, answer.text


def _report_real_loads(node: RunningNode, pipeline_id: str) -> None:
    """Load the warm pipeline for real (HTTP, CPU) and report each load as a replica does."""
    with node.client("tok-a") as client:
        for tp_size, rank in ((1, 0), (2, 0), (2, 1), (1, 0)):
            result = load(
                pipeline_id, tp_size=tp_size, rank=rank, url=node.url, token="tok-a", verify=True
            )
            r = result.report
            body = {
                "tp_size": tp_size,
                "rank": rank,
                "device": r.device,
                "bytes": r.bytes,
                "stages": {
                    "lease": r.lease_s,
                    "manifest": r.manifest_s,
                    "connect": r.stream.connect_s,
                    "stream": r.stream.stream_s,
                    "verify": r.stream.verify_s,
                    "total": r.total_s,
                },
                "gbps": r.gb_per_s,
                "source": "http",
            }
            answer = client.post(f"/v1/pipelines/{pipeline_id}/loads", json=body)
            assert answer.status_code == 202, answer.text


def _upload_captures(node: RunningNode, pipeline_id: str) -> None:
    """Both ranks' engine shard sets at TP 2, as a replica's workers upload them."""
    with node.client("tok-a") as client, \
            CaptureClient(node.url, pipeline_id, token="tok-a") as captures:
        manifest = client.get(f"/v1/pipelines/{pipeline_id}/manifest",
                              params={"tp_size": 2, "rank": 0}).json()
        for rank in range(2):
            key = CaptureKey(kind="weights", model="llm", engine="vllm", engine_version="0.32.0",
                             tp_size=2, rank=rank, pp_size=1, pp_rank=0, dtype="float32",
                             quantization="none", device="cpu-x86_64-avx2",
                             snapshot=manifest["snapshots"]["llm"], settings="5" * 64)
            tensors = {"w": torch.full((64, 64), float(rank))}
            captures.upload_payload(key, CapturePayload.build(tensors, stage="loaded"))


def _progress(page: Page, pipeline_id: str) -> float:
    fill = page.locator(f'.card[data-pipeline="{pipeline_id}"] .progress-fill')
    return float(fill.get_attribute("data-progress") or "nan")


def _wait_until(condition: Any, what: str, *, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


def test_dashboard_shows_states_progress_and_failures_for_one_tenant(
    tmp_path: Path, browser: Browser
) -> None:
    models = tmp_path / "models"
    make_tiny_llama(models / "tiny-llama")
    make_tiny_llama(models / "search-ranker", seed=1)
    with FixtureHub(stall_s=STALL_S) as hub, _start_node(tmp_path, hub) as node:
        _hub_repos(hub)
        with node.client("tok-a") as a, node.client("tok-b") as b:
            _register(b, "b-private-search", {
                "models": [{"name": "ranker", "source": f"file://{models / 'search-ranker'}"}],
            })
            _register(a, "chat-assistant", {
                "models": [{"name": "llm", "source": f"file://{models / 'tiny-llama'}"}],
                "tp_sizes": [1, 2],
                "pinned": True,
            })
            _register(a, "summarizer-beta", {
                "models": [{"name": "llm", "source": "hf://acme/summarizer"}],
            })
            assert wait_for_state(b, "b-private-search", {"warm", "failed"})["state"] == "warm"
            assert wait_for_state(a, "chat-assistant", {"warm", "failed"})["state"] == "warm"
            failed = wait_for_state(a, "summarizer-beta", {"warm", "failed"})
            assert failed["state"] == "failed", failed
            _report_real_loads(node, "chat-assistant")
            _upload_captures(node, "chat-assistant")

            errors: list[str] = []
            page = browser.new_page(viewport={"width": 1440, "height": 900})
            page.on("console", lambda m: _keep_errors(m, errors))
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(node.url + "/")

            # auth is on: the page asks for a token, and shows the token's tenant only
            page.locator("#token-dialog[open]").wait_for()
            page.fill("#token-input", "tok-a")
            page.click("#token-form button[type=submit]")
            page.locator('.card[data-pipeline="chat-assistant"]').wait_for()

            # registered while the page is open: it appears, warming, and its bar moves
            _register(a, "voice-agent", {
                "models": [
                    {"name": "asr", "source": "hf://acme/whisper-tiny"},
                    {"name": "tts", "source": "hf://acme/tts-tiny"},
                ],
            })
            voice = page.locator('.card[data-pipeline="voice-agent"]')
            voice.locator('.chip[data-state="warming"]').wait_for()
            _wait_until(lambda: _progress(page, "voice-agent") > 0, "voice-agent never moved")
            first = _progress(page, "voice-agent")
            first_width = voice.locator(".progress-fill").bounding_box()
            _wait_until(
                lambda: _progress(page, "voice-agent") > first,
                f"voice-agent's progress stayed at {first}%",
            )
            second = _progress(page, "voice-agent")
            assert 0 < first < second < 100
            assert voice.locator(".chip").inner_text() == "cache: warming"
            page.wait_for_timeout(1000)  # the bar's width animates to the new value
            second_width = voice.locator(".progress-fill").bounding_box()
            assert first_width is not None
            assert second_width is not None
            assert second_width["width"] > first_width["width"]

            chat = page.locator('.card[data-pipeline="chat-assistant"]')
            assert chat.locator(".chip").inner_text() == "cache: warm"
            assert chat.locator('.shard[data-ready="ready"]').count() == 2
            assert chat.locator(".badge.pinned").count() == 1
            assert chat.locator(".loads tbody tr").count() == 4
            # both ranks' engine shard sets, as one line: what they are for, ranks and bytes
            assert chat.locator(".capture").count() == 1
            captured = chat.locator(".capture").inner_text()
            assert "llm · TP 2 · float32" in captured
            assert "vllm 0.32.0" in captured
            assert "ranks 0, 1 · loaded tensors" in captured
            summarizer = page.locator('.card[data-pipeline="summarizer-beta"]')
            assert summarizer.locator(".chip").inner_text() == "cache: failed"
            error = failed["error"]
            assert summarizer.locator(".error-code").inner_text() == error["code"]
            assert summarizer.locator(".error-message").inner_text() == error["message"]
            if error.get("retry_at") is not None:
                assert "retries" in summarizer.locator(".error-retry").inner_text()
            assert page.locator(".card").count() == 3
            assert "b-private-search" not in page.content()
            assert page.locator("#node-id").inner_text() == "cache-eu-west-1a"
            assert page.locator(".chart svg .bar").count() == 4

            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

            # the filter shows only failed pipelines; the page keeps updating live
            page.click('[data-filter="failed"]')
            assert page.locator(".card").count() == 1
            # "Warm now" re-warms it by hand, whatever its retry_at says: the origin is asked
            asked = hub.requests("model-fault-500.safetensors")
            summarizer.locator('button[data-action="warm"]').click()
            _wait_until(lambda: hub.requests("model-fault-500.safetensors") > asked,
                        "Warm now did not reach the origin")
            page.click('[data-filter="all"]')
            assert wait_for_state(a, "voice-agent", {"warm", "failed"})["state"] == "warm"
            voice.locator('.chip[data-state="warm"]').wait_for()
            assert errors == []
            page.close()


def _keep_errors(message: ConsoleMessage, errors: list[str]) -> None:
    # a 401 before the token is given is the page's expected first answer
    if message.type == "error" and "401" not in message.text:
        errors.append(message.text)


def test_dashboard_assets_are_local_and_locked_down(tmp_path: Path) -> None:
    with running_node(data_dir=tmp_path / "data", capacity="64MiB") as node, node.client() as c:
        page = c.get("/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        csp = page.headers["content-security-policy"]
        assert "default-src 'none'" in csp
        assert "script-src 'self'" in csp
        assert "http://" not in page.text
        assert "https://" not in page.text
        for asset in ("dashboard.js", "dashboard.css", "favicon.svg"):
            answer = c.get(f"/static/{asset}")
            assert answer.status_code == 200, asset
            assert "https://" not in answer.text
            assert "http://" not in answer.text.replace(
                "http://www.w3.org/2000/svg", ""
            )
        assert c.get("/static/app.py").status_code == 404
        assert c.get("/static/..%2Fapp.py").status_code == 404

