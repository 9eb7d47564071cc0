"""The Python SDK: ``Client`` and ``AsyncClient``, twins over one pure base.

Both take ``transport=`` (an httpx transport), so tests can run client and app in one process::

    with Client("http://127.0.0.1:8470") as client:
        client.register("chat", models=[ModelSpec(name="llm", source="hf://org/model")])
        client.wait_until_warm("chat")
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import httpx

from api.schema import (
    Lease,
    Manifest,
    ModelSpec,
    NodeInfo,
    PipelineList,
    PipelineSpec,
    PipelineStatus,
    RegionInfo,
)
from clients.errors import WarmFailed, raise_for_status

DEFAULT_URL = "http://127.0.0.1:8470"
_TERMINAL_FAILURE = {"failed"}


def default_url(url: str | None = None) -> str:
    """``url``, else ``WEIGHTCACHE_URL``, else the local default."""
    return url or os.environ.get("WEIGHTCACHE_URL") or DEFAULT_URL


def default_token(token: str | None = None) -> str | None:
    """``token``, else ``WEIGHTCACHE_TOKEN``."""
    return token or os.environ.get("WEIGHTCACHE_TOKEN") or None


def auth_headers(token: str | None) -> dict[str, str]:
    """The headers that present ``token`` to a node (none without a token)."""
    return {"Authorization": f"Bearer {token}"} if token else {}


class _BaseClient:
    """Request building and answer parsing, shared by the sync and async clients."""

    def __init__(self, url: str | None, token: str | None, tenant: str | None = None) -> None:
        self.url = default_url(url).rstrip("/")
        self.token = default_token(token)
        self.tenant = tenant

    def _headers(self) -> dict[str, str]:
        return auth_headers(self.token)

    def _params(self) -> dict[str, str]:
        # Sent with every request: for an admin token it selects whose pipelines it addresses
        # (two tenants may use one id); another token may name only its own tenant.
        return {"tenant": self.tenant} if self.tenant else {}

    @staticmethod
    def _spec(
        models: Sequence[ModelSpec | dict[str, Any]], tp_sizes: Sequence[int], pinned: bool
    ) -> dict[str, Any]:
        spec = PipelineSpec(
            models=[m if isinstance(m, ModelSpec) else ModelSpec(**m) for m in models],
            tp_sizes=list(tp_sizes),
            pinned=pinned,
        )
        return spec.model_dump(mode="json", exclude_none=True)

    @staticmethod
    def _parse(response: httpx.Response) -> Any:
        raise_for_status(response)
        return response.json() if response.content else None

    @staticmethod
    def _check_wait(status: PipelineStatus) -> bool:
        if status.state in _TERMINAL_FAILURE:
            error = status.error
            raise WarmFailed(
                409,
                error.code if error else "failed",
                error.message if error else "warm failed",
                {"retry_at": error.retry_at if error else None},
            )
        return status.state == "warm"


class Client(_BaseClient):
    """Synchronous client of one cache node."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        tenant: str | None = None,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, tenant)
        self.http = httpx.Client(
            base_url=self.url,
            headers=self._headers(),
            params=self._params(),
            timeout=timeout,
            transport=transport,
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def register(
        self,
        pipeline_id: str,
        *,
        models: Sequence[ModelSpec | dict[str, Any]],
        tp_sizes: Sequence[int] = (1,),
        pinned: bool = False,
    ) -> PipelineStatus:
        """Register (upsert) a pipeline; the node starts warming it at once."""
        body = self._spec(models, tp_sizes, pinned)
        return PipelineStatus.model_validate(
            self._parse(self.http.put(f"/v1/pipelines/{pipeline_id}", json=body))
        )

    def status(self, pipeline_id: str) -> PipelineStatus:
        return PipelineStatus.model_validate(
            self._parse(self.http.get(f"/v1/pipelines/{pipeline_id}"))
        )

    def pipelines(self) -> list[PipelineStatus]:
        return PipelineList.model_validate(self._parse(self.http.get("/v1/pipelines"))).pipelines

    def warm(self, pipeline_id: str) -> PipelineStatus:
        return PipelineStatus.model_validate(
            self._parse(self.http.post(f"/v1/pipelines/{pipeline_id}/warm"))
        )

    def evict(self, pipeline_id: str) -> PipelineStatus:
        return PipelineStatus.model_validate(
            self._parse(self.http.post(f"/v1/pipelines/{pipeline_id}/evict"))
        )

    def delete(self, pipeline_id: str) -> None:
        self._parse(self.http.delete(f"/v1/pipelines/{pipeline_id}"))

    def manifest(self, pipeline_id: str, *, tp_size: int = 1, rank: int = 0) -> Manifest:
        params = {"tp_size": tp_size, "rank": rank}
        return Manifest.model_validate(
            self._parse(self.http.get(f"/v1/pipelines/{pipeline_id}/manifest", params=params))
        )

    def files(self, pipeline_id: str) -> list[dict[str, Any]]:
        """Every file of the pipeline: model, path, blob, size."""
        body = self._parse(self.http.get(f"/v1/pipelines/{pipeline_id}/files"))
        return list(body["files"])

    def lease(self, pipeline_id: str) -> Lease:
        return Lease.model_validate(
            self._parse(self.http.post(f"/v1/pipelines/{pipeline_id}/leases"))
        )

    def release(self, lease_id: str) -> None:
        self._parse(self.http.delete(f"/v1/leases/{lease_id}"))

    def node(self) -> NodeInfo:
        return NodeInfo.model_validate(self._parse(self.http.get("/v1/node")))

    def region(self) -> RegionInfo:
        """The node's region: its live nodes, and copies of the pipelines the caller sees."""
        return RegionInfo.model_validate(self._parse(self.http.get("/v1/region")))

    def wait_until_warm(
        self,
        pipeline_id: str,
        *,
        timeout_s: float = 3600.0,
        poll_s: float = 0.5,
        on_status: Callable[[PipelineStatus], None] | None = None,
    ) -> PipelineStatus:
        """Block until the pipeline is warm; re-warm it first if it was evicted or cold.

        Raises :class:`WarmFailed` if it fails, TimeoutError after ``timeout_s``.
        """
        status = self.status(pipeline_id)
        if status.state in ("evicted", "cold"):
            status = self.warm(pipeline_id)
        deadline = time.monotonic() + timeout_s
        while True:
            if on_status is not None:
                on_status(status)
            if self._check_wait(status):
                return status
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pipeline_id} not warm after {timeout_s:.0f} s")
            time.sleep(poll_s)
            status = self.status(pipeline_id)


class AsyncClient(_BaseClient):
    """Asynchronous twin of :class:`Client`."""

    def __init__(
        self,
        url: str | None = None,
        *,
        token: str | None = None,
        tenant: str | None = None,
        timeout: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, token, tenant)
        self.http = httpx.AsyncClient(
            base_url=self.url,
            headers=self._headers(),
            params=self._params(),
            timeout=timeout,
            transport=transport,
        )

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def register(
        self,
        pipeline_id: str,
        *,
        models: Sequence[ModelSpec | dict[str, Any]],
        tp_sizes: Sequence[int] = (1,),
        pinned: bool = False,
    ) -> PipelineStatus:
        body = self._spec(models, tp_sizes, pinned)
        answer = await self.http.put(f"/v1/pipelines/{pipeline_id}", json=body)
        return PipelineStatus.model_validate(self._parse(answer))

    async def status(self, pipeline_id: str) -> PipelineStatus:
        answer = await self.http.get(f"/v1/pipelines/{pipeline_id}")
        return PipelineStatus.model_validate(self._parse(answer))

    async def pipelines(self) -> list[PipelineStatus]:
        answer = await self.http.get("/v1/pipelines")
        return PipelineList.model_validate(self._parse(answer)).pipelines

    async def warm(self, pipeline_id: str) -> PipelineStatus:
        answer = await self.http.post(f"/v1/pipelines/{pipeline_id}/warm")
        return PipelineStatus.model_validate(self._parse(answer))

    async def evict(self, pipeline_id: str) -> PipelineStatus:
        answer = await self.http.post(f"/v1/pipelines/{pipeline_id}/evict")
        return PipelineStatus.model_validate(self._parse(answer))

    async def delete(self, pipeline_id: str) -> None:
        self._parse(await self.http.delete(f"/v1/pipelines/{pipeline_id}"))

    async def manifest(self, pipeline_id: str, *, tp_size: int = 1, rank: int = 0) -> Manifest:
        params = {"tp_size": tp_size, "rank": rank}
        answer = await self.http.get(f"/v1/pipelines/{pipeline_id}/manifest", params=params)
        return Manifest.model_validate(self._parse(answer))

    async def lease(self, pipeline_id: str) -> Lease:
        answer = await self.http.post(f"/v1/pipelines/{pipeline_id}/leases")
        return Lease.model_validate(self._parse(answer))

    async def release(self, lease_id: str) -> None:
        self._parse(await self.http.delete(f"/v1/leases/{lease_id}"))

    async def node(self) -> NodeInfo:
        return NodeInfo.model_validate(self._parse(await self.http.get("/v1/node")))

    async def region(self) -> RegionInfo:
        return RegionInfo.model_validate(self._parse(await self.http.get("/v1/region")))

    async def wait_until_warm(
        self, pipeline_id: str, *, timeout_s: float = 3600.0, poll_s: float = 0.5
    ) -> PipelineStatus:
        """Like :meth:`Client.wait_until_warm`."""
        status = await self.status(pipeline_id)
        if status.state in ("evicted", "cold"):
            status = await self.warm(pipeline_id)
        deadline = time.monotonic() + timeout_s
        while not self._check_wait(status):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{pipeline_id} not warm after {timeout_s:.0f} s")
            await asyncio.sleep(poll_s)
            status = await self.status(pipeline_id)
        return status
