"""Fixtures of the real-engine tests (``make test-vllm``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.vllm_engine.harness import VLLM_PYTHON


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM venv's Python (``make test-vllm`` builds it)."""
    if not VLLM_PYTHON.exists():
        pytest.fail(f"no vLLM venv at {VLLM_PYTHON}: run `make test-vllm`")
    return VLLM_PYTHON
