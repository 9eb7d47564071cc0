"""Shared fixtures: the anyio backend, and real servers started once per session."""

from __future__ import annotations

import pytest


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
