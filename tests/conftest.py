"""Shared fixtures: the anyio backend, and real servers started once per session."""

from __future__ import annotations

import os

import pytest

# huggingface_hub must never phone home from a test.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

# Fixtures that start real servers, available to every test module.
pytest_plugins = [
    "tests.fixtures.browser",
    "tests.fixtures.hf_hub",
    "tests.fixtures.redis_server",
    "tests.fixtures.seaweed",
]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
