"""A cache node served by uvicorn in a background thread of this process.

For the demo and the tests: the node's service object stays reachable (``.node``) beside its URL.
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Self

import uvicorn

from api.app import create_app
from cache_node.node import CacheNode
from cache_node.settings import NodeSettings


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class EmbeddedNode:
    """A node serving on ``url`` (loopback, ``settings.port``) until :meth:`stop`."""

    def __init__(self, settings: NodeSettings) -> None:
        self.settings = settings
        self.node = CacheNode(settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(
            create_app(settings, node=self.node),
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            lifespan="on",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self, *, timeout_s: float = 30.0) -> Self:
        """Serve, and return once the node has started (reconciled, jobs resumed)."""
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the embedded cache node did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=30)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
