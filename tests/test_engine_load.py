"""An engine rank's load with engine shard sets, through a real node, with a toy engine.

No vLLM here: :func:`loader.engine_load.load_engine_model` takes the engine as three hooks
(build the model, post-process it, say whether post-processed weights can be taken back), so a
toy model stands in for vLLM's. Its weight loader slices full tensors by TP rank, as vLLM's do;
its post-processing either packs a weight away into a non-tensor (as vLLM's CPU GEMM dispatch
does: the capture then holds the ``loaded`` tensors) or rewrites a buffer in place (a
``processed`` capture then holds the result, and a replay skips it).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch
from safetensors.torch import save_file

from loader.captures import CaptureMismatch, weights_settings
from loader.engine_load import EngineFacts, load_engine_model
from tests.fixtures.metrics import metric_value
from tests.fixtures.node_server import RunningNode, running_node, wait_for_state

HIDDEN, OUT, TP = 16, 8, 2


def _checkpoint() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    return {
        "proj.weight": torch.randn(OUT, HIDDEN, generator=generator),
        "proj.bias": torch.randn(OUT, generator=generator),
        "head.weight": torch.randn(4, OUT, generator=generator),
    }


class Toy(torch.nn.Module):
    """One rank of a column-parallel ``proj`` (rows split by rank) and a replicated ``head``."""

    scale: torch.Tensor

    def __init__(self, tp_size: int, rank: int) -> None:
        super().__init__()
        self.tp_size, self.rank = tp_size, rank
        rows = OUT // tp_size
        self.proj = torch.nn.Linear(HIDDEN, rows)
        self.head = torch.nn.Linear(rows, 4, bias=False)
        self.register_buffer("scale", torch.ones(()))
        self.packed: torch.Tensor | None = None  # where "post-processing" puts proj's weight
        for tensor in self.parameters():
            torch.nn.init.constant_(tensor, float("nan"))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """What a vLLM weight loader does: take full tensors, keep this rank's slice."""
        params, rows = dict(self.named_parameters()), OUT // self.tp_size
        with torch.no_grad():
            for name, tensor in weights:
                if name.startswith("proj."):
                    tensor = tensor.narrow(0, self.rank * rows, rows)
                else:
                    tensor = tensor.narrow(1, self.rank * rows, rows)
                params[name].copy_(tensor)
        return set(params)

    def state(self) -> dict[str, torch.Tensor]:
        """What the rank computes with, wherever post-processing put it."""
        weight = self.packed if self.packed is not None else self.proj.weight
        return {"proj": weight.clone(), "bias": self.proj.bias.clone(),
                "head": self.head.weight.clone(), "scale": self.scale.clone()}


class ToyEngine:
    """The hooks ``load_engine_model`` needs. ``packs``: post-processing moves ``proj.weight``
    out of its parameter (the CPU GEMM way); else it doubles ``scale`` in place."""

    def __init__(
        self, rank: int, *, packs: bool, version: str = "1.0", rope_theta: float = 1e4
    ) -> None:
        settings = weights_settings({"hidden_size": 16, "rope_theta": rope_theta,
                                     "_name_or_path": f"/staged/on/host-{rank}"},
                                    max_model_len=64)
        self.facts = EngineFacts(engine="toy", engine_version=version, tp_size=TP, rank=rank,
                                 pp_size=1, pp_rank=0, dtype="float32", quantization=None,
                                 settings=settings)
        self.packs = packs
        self.post_processed: list[bool] = []

    def create_model(self) -> torch.nn.Module:
        return Toy(TP, self.facts.rank)

    def post_process(self, model: torch.nn.Module, *, already_processed: bool) -> None:
        assert isinstance(model, Toy)
        self.post_processed.append(already_processed)
        if already_processed:
            return
        if self.packs:
            model.packed = model.proj.weight.detach().clone()
            model.proj.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)
        else:
            with torch.no_grad():
                model.scale.mul_(2)

    def processed_blocker(self, model: torch.nn.Module) -> str | None:
        return None


@pytest.fixture
def node(tmp_path: Path) -> Iterator[RunningNode]:
    source = tmp_path / "toy"
    source.mkdir()
    save_file(_checkpoint(), str(source / "model.safetensors"))
    (source / "config.json").write_text('{"model_type": "toy"}')  # no split rules: full mode
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, \
            node.client() as client:
        body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": [1, 2]}
        assert client.put("/v1/pipelines/toy", json=body).status_code == 202
        assert wait_for_state(client, "toy", {"warm", "failed"})["state"] == "warm"
        yield node


def _load(node: RunningNode, engine: ToyEngine, **options: Any) -> Toy:
    model = load_engine_model(engine, {"pipeline": "toy", "url": node.url, **options})
    assert isinstance(model, Toy)
    return model


def _captures(node: RunningNode, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 30
    while True:
        listed: list[dict[str, Any]] = httpx.get(
            f"{node.url}/v1/pipelines/toy/captures").json()["captures"]
        if len(listed) >= count or time.monotonic() > deadline:
            return listed
        time.sleep(0.05)


def _last_report(node: RunningNode, rank: int) -> dict[str, Any]:
    loads = httpx.get(f"{node.url}/v1/pipelines/toy/loads").json()["loads"]
    report: dict[str, Any] = next(r for r in loads if r["rank"] == rank)
    return report


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_load_uploads_its_loaded_tensors_and_the_next_one_replays_them(
    node: RunningNode,
) -> None:
    first = {rank: _load(node, ToyEngine(rank, packs=True)) for rank in range(TP)}
    captures = _captures(node, TP)
    assert sorted(c["key"]["rank"] for c in captures) == list(range(TP))
    # post-processing took proj.weight out of its parameter: the capture is what it was before
    assert {c["stage"] for c in captures} == {"loaded"}
    with httpx.Client(base_url=node.url) as c:  # the node counts both outcomes
        assert metric_value(c, "weightcache_capture_replays_total", result="missed") == TP
        assert metric_value(c, "weightcache_capture_uploads_total", kind="weights",
                            outcome="stored") == TP
    for rank in range(TP):
        assert _last_report(node, rank)["capture"]["used"] is False
        engine = ToyEngine(rank, packs=True)
        replayed = _load(node, engine)
        use = _last_report(node, rank)["capture"]
        assert (use["used"], use["stage"]) == (True, "loaded")
        assert engine.post_processed == [False]  # the packing is not in the capture: redone
        assert _same(replayed.state(), first[rank].state())
        # each rank read its own slice and the replicated head, not the whole checkpoint
        checkpoint = sum(t.numel() * 4 for t in _checkpoint().values())
        assert _last_report(node, rank)["bytes"] < checkpoint
    assert len(_captures(node, TP)) == TP  # a replay uploads nothing
    with httpx.Client(base_url=node.url) as c:
        assert metric_value(c, "weightcache_capture_replays_total", result="replayed") == TP


def test_a_processed_capture_is_replayed_without_post_processing(node: RunningNode) -> None:
    first = {rank: _load(node, ToyEngine(rank, packs=False)) for rank in range(TP)}
    assert {c["stage"] for c in _captures(node, TP)} == {"processed"}
    for rank in range(TP):
        engine = ToyEngine(rank, packs=False)
        replayed = _load(node, engine)
        assert engine.post_processed == [True]  # only what is not a tensor would be rebuilt
        assert replayed.scale.item() == 2.0  # doubled once, in the first start, not again
        assert _same(replayed.state(), first[rank].state())


def test_a_key_that_differs_finds_nothing_and_says_which_field(node: RunningNode) -> None:
    for rank in range(TP):
        _load(node, ToyEngine(rank, packs=True))
    _captures(node, TP)
    model = _load(node, ToyEngine(0, packs=True, version="2.0"), capture="replay-only")
    use = _last_report(node, 0)["capture"]
    assert use["used"] is False
    assert "engine_version '1.0' there, '2.0' here" in use["reason"]
    # an override of the model config (another rope base: other buffers) is another key
    _load(node, ToyEngine(0, packs=True, rope_theta=5e5), capture="replay-only")
    use = _last_report(node, 0)["capture"]
    assert use["used"] is False
    assert "settings" in use["reason"]
    assert _same(model.state(), _load(node, ToyEngine(0, packs=True)).state())
    off = _load(node, ToyEngine(1, packs=True), capture=False)
    assert _last_report(node, 1)["capture"]["reason"].startswith("captures are off")
    assert off.packed is not None


def _corrupt(node: RunningNode, rank: int, *, of: int) -> None:
    """Flip a bit of rank ``rank``'s capture on the node's disk, once ``of`` are there."""
    capture = next(c for c in _captures(node, of) if c["key"]["rank"] == rank)
    sha = httpx.get(f"{node.url}/v1/pipelines/toy/captures/{capture['id']}"
                    ).json()["blob"]["sha256"]
    path = node.settings.data_dir / "blobs" / sha[:2] / sha
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_capture_that_fails_its_digests_falls_back_to_the_normal_load(
    node: RunningNode,
) -> None:
    expected = _load(node, ToyEngine(0, packs=True)).state()
    _load(node, ToyEngine(1, packs=True))
    _corrupt(node, 0, of=TP)
    engine = ToyEngine(0, packs=True)
    model = _load(node, engine, capture="replay-only")
    use = _last_report(node, 0)["capture"]
    assert use["used"] is False
    assert "its bytes failed" in use["reason"]
    assert _same(model.state(), expected)  # the normal load's, nothing of the bad capture
    assert engine.post_processed == [False]
    assert [c["key"]["rank"] for c in _captures(node, 1)] == [1]  # the bad one is gone


def test_a_processed_capture_that_fails_midway_stops_the_start(node: RunningNode) -> None:
    _load(node, ToyEngine(0, packs=False))
    _corrupt(node, 0, of=1)
    with pytest.raises(CaptureMismatch, match="cannot be undone in place"):
        _load(node, ToyEngine(0, packs=False))
    # the node put it aside: the next start loads the normal way
    model = _load(node, ToyEngine(0, packs=False), capture="replay-only")
    assert _last_report(node, 0)["capture"]["used"] is False
    assert model.scale.item() == 2.0
