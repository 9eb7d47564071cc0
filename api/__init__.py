"""The cache node's HTTP API. ``create_app`` needs FastAPI; ``api.schema`` does not."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from cache_node.settings import NodeSettings

__all__ = ["create_app"]


def create_app(settings: NodeSettings, **kwargs: Any) -> FastAPI:
    """Build the FastAPI app of one cache node (imported lazily: clients need no FastAPI)."""
    from api.app import create_app as _create_app

    return _create_app(settings, **kwargs)
