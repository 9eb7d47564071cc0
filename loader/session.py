"""A rank's session with its cache node: the lease, the manifest, and a source for the bytes.

::

    with RankSession("chat-8b", tp_size=2, rank=0, device="cuda:0") as session:
        tensors, session.report.stream = load_manifest(
            session.manifest, source=session.source, device="cuda:0"
        )
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import torch

from api.schema import Lease, Manifest
from clients.client import auth_headers, default_token, default_url
from clients.errors import raise_for_status
from loader.errors import LoaderError, NoWeightsError
from loader.report import LoadReport
from loader.sources import HttpRangeSource, LocalFileSource, RoutingSource, Source

__all__ = ["RankSession"]


class RankSession:
    """One rank of a pipeline, leased: its manifest and a source for its bytes until closed.

    ``with RankSession(...) as session`` takes the lease and the manifest; leaving the block
    closes the source and releases the lease, whatever happened (``report.total_s`` is set
    then). What to do with the bytes is the caller's (:mod:`loader.manifest_stream`):
    ``load_manifest`` into a fresh flat allocation, ``stream_into`` existing tensors, or
    ``iter_tensors`` a batch at a time.
    """

    def __init__(
        self,
        pipeline: str,
        *,
        tp_size: int = 1,
        rank: int = 0,
        device: str | torch.device = "cpu",
        url: str | None = None,
        token: str | None = None,
        local_dir: Path | None = None,
        http: httpx.Client | None = None,
        data_urls: Sequence[str] | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.tp_size = tp_size
        self.rank = rank
        self.url = default_url(url).rstrip("/")
        self.token = default_token(token)
        self.report = LoadReport(
            pipeline=pipeline, tp_size=tp_size, rank=rank, device=str(torch.device(device))
        )
        self._headers = auth_headers(self.token)
        self._own_client = http is None
        self._client = http or httpx.Client(timeout=httpx.Timeout(30.0))
        self._local_dir = local_dir
        self._data_urls = data_urls
        self._lease_url: str | None = None
        self._source: Source | None = None
        self.remote: HttpRangeSource | None = None
        self._manifest: Manifest | None = None
        self._started = 0.0

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            raise LoaderError("the session is not open")
        return self._manifest

    @property
    def source(self) -> Source:
        if self._source is None:
            raise LoaderError("the session is not open")
        return self._source

    def __enter__(self) -> RankSession:
        self._started = time.perf_counter()
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _open(self) -> None:
        client, url, headers = self._client, self.url, self._headers
        response = client.post(f"{url}/v1/pipelines/{self.pipeline}/leases", headers=headers)
        raise_for_status(response, context=f"lease on {self.pipeline}")
        lease = Lease.model_validate_json(response.content)
        self._lease_url = f"{url}/v1/leases/{lease.lease_id}"
        self.report.lease_s = time.perf_counter() - self._started
        mark = time.perf_counter()
        response = client.get(
            f"{url}/v1/pipelines/{self.pipeline}/manifest",
            params={"tp_size": self.tp_size, "rank": self.rank},
            headers=headers,
        )
        raise_for_status(
            response,
            context=f"manifest of {self.pipeline} tp_size={self.tp_size} rank={self.rank}",
        )
        self._manifest = Manifest.model_validate_json(response.content)
        self.report.manifest_s = time.perf_counter() - mark
        if not self._manifest.tensors:
            # a pipeline with no weight tensors never "loads": nothing would reach the device
            raise NoWeightsError(
                f"{self.pipeline}: the manifest of tp_size={self.tp_size} rank={self.rank} "
                "holds no tensors"
            )
        data_urls = self._data_urls or _advertised_data_urls(client, url, headers)
        # The API serves the same verified bytes: the fallback when the data plane fails.
        fallback = [url] if url not in data_urls else []
        # In a region, each blob's ranges spread over the nodes holding it; this node's own
        # URLs come after them.
        holders = {blob.sha256: blob.nodes for blob in self._manifest.blobs if blob.nodes}
        remote = HttpRangeSource(
            list(data_urls), token=self.token, fallback_urls=fallback, holders=holders
        )
        self.remote = remote
        self._source = (
            RoutingSource(LocalFileSource(self._local_dir), remote) if self._local_dir else remote
        )

    def note_remote(self) -> None:
        """Copy into the report which nodes served the bytes, which failed, and the fallbacks
        (done by :meth:`close` too)."""
        remote = self.remote
        if remote is None:
            return
        self.report.bytes_by_node = remote.bytes_by_node()
        self.report.failed_nodes = remote.failed_nodes()
        self.report.failovers = remote.failovers
        if remote.fallback_reads:
            self.report.fallback_reads = remote.fallback_reads
            self.report.fallback_reason = remote.fallback_reason

    def close(self) -> None:
        """Close the source, release the lease (idempotent)."""
        try:
            self.note_remote()
            if self._source is not None:
                self._source.close()
            if self._lease_url is not None:
                _release(self._client, self._lease_url, self._headers)
                self._lease_url = None
        finally:
            if self._own_client:
                self._client.close()
            if self._started:
                self.report.total_s = time.perf_counter() - self._started


def _advertised_data_urls(client: httpx.Client, url: str, headers: dict[str, str]) -> list[str]:
    """The node's data plane (``GET /v1/node`` → ``data_url``), or ``url`` when it has none."""
    response = client.get(f"{url}/v1/node", headers=headers)
    data_url = response.json().get("data_url") if response.status_code == 200 else None
    return [data_url.rstrip("/")] if isinstance(data_url, str) and data_url else [url]


def _release(client: httpx.Client, lease_url: str, headers: dict[str, str]) -> None:
    # A lease that cannot be released expires on its own; never hide the load's own outcome.
    with contextlib.suppress(httpx.HTTPError):
        client.delete(lease_url, headers=headers)
