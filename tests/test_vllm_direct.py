"""The vLLM plugin's load path, end to end through a real node, into vLLM-shaped parameters.

No vLLM here: ``load_rank_into`` takes any ``nn.Module`` laid out as vLLM lays out a Llama
(fused ``qkv_proj`` / ``gate_up_proj``, padded vocab rows). The expected parameters are sliced
straight from the original checkpoint by the independent rule in ``test_vllm_weights``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from loader.vllm_plugin import load_rank_into
from loader.vllm_weights import WeightMismatch
from tests.fixtures.node_server import running_node, wait_for_state
from tests.fixtures.tiny_llama import make_tiny_llama
from tests.test_vllm_weights import _expected_params


class VllmShaped(torch.nn.Module):
    """Parameters named and shaped as vLLM's rank holds them, filled with NaN."""

    def __init__(self, shapes: dict[str, torch.Size], dtype: torch.dtype) -> None:
        super().__init__()
        self._names = {}
        for index, (name, shape) in enumerate(sorted(shapes.items())):
            attribute = f"p{index}"
            self.register_parameter(
                attribute,
                torch.nn.Parameter(torch.full(shape, float("nan"), dtype=dtype), False),
            )
            self._names[name] = attribute

    def named_parameters(self, *args: Any, **kwargs: Any) -> Any:  # vLLM's names
        by_attribute = {a: n for n, a in self._names.items()}
        for attribute, param in super().named_parameters(*args, **kwargs):
            yield by_attribute[attribute], param


def _warm(client: Any, source: Path, pipeline: str, tp_sizes: list[int]) -> None:
    body = {"models": [{"name": "llm", "source": f"file://{source}"}], "tp_sizes": tp_sizes}
    assert client.put(f"/v1/pipelines/{pipeline}", json=body).status_code == 202
    assert wait_for_state(client, pipeline, {"warm", "failed"})["state"] == "warm"


@pytest.mark.parametrize(
    ("checkpoint", "engine", "verify"),
    [
        (torch.float32, torch.float32, False),  # same dtype: read straight into parameters
        (torch.bfloat16, torch.float32, True),  # cast per staging buffer, verified chunks
        (torch.float32, torch.bfloat16, False),
    ],
)
def test_rank_streams_into_vllm_parameters(
    tmp_path: Path, checkpoint: torch.dtype, engine: torch.dtype, verify: bool
) -> None:
    source = make_tiny_llama(
        tmp_path / "src", num_kv_heads=2, vocab_size=1001, tie=False, dtype=checkpoint
    )
    config = json.loads((source / "config.json").read_text())
    original = load_file(str(source / "model.safetensors"))
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        _warm(c, source, "tiny", [2, 4])
        for tp_size in (2, 4):
            for rank in range(tp_size):
                expected = _expected_params(original, config, tp_size, rank)
                model = VllmShaped({n: t.shape for n, t in expected.items()}, engine)
                options = {"pipeline": "tiny", "url": node.url, "verify": verify}
                report = load_rank_into(model, options, tp_size=tp_size, rank=rank)
                assert report["mode"] == "rank shard straight into the parameters"
                params = dict(model.named_parameters())
                for name, tensor in expected.items():
                    # vLLM's copy_ casts; so does the sink, and to the same values
                    assert torch.equal(params[name], tensor.to(engine)), (tp_size, rank, name)
        # every rank's cold start is in the node's history
        loads = c.get("/v1/pipelines/tiny/loads").json()["loads"]
        assert sorted((entry["tp_size"], entry["rank"]) for entry in loads) == [
            (2, 0), (2, 1), (4, 0), (4, 1), (4, 2), (4, 3)
        ]


def test_a_shard_that_does_not_fit_is_refused_before_a_byte_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = make_tiny_llama(tmp_path / "src", num_kv_heads=2, vocab_size=1001, tie=False)
    config = json.loads((source / "config.json").read_text())
    original = load_file(str(source / "model.safetensors"))
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        _warm(c, source, "tiny", [2])
        expected = _expected_params(original, config, 2, 1)
        shapes = {n: t.shape for n, t in expected.items()}
        # an engine sized by the old ceil(V/N) rule: 501 vocab rows per rank, not 512
        shapes["lm_head.weight"] = torch.Size([501, 64])
        model = VllmShaped(shapes, torch.float32)
        with pytest.raises(WeightMismatch, match=r"\[512, 64\].*\[501, 64\]") as caught:
            load_rank_into(model, {"pipeline": "tiny", "url": node.url}, tp_size=2, rank=1)
        assert caught.value.code == "shape_mismatch"
        assert all(torch.isnan(p).all() for p in model.parameters()), "nothing was written"
        assert "weightcache: rank 1/2 load failed: shape_mismatch" in capsys.readouterr().err
        del shapes["model.norm.weight"]
        shapes["lm_head.weight"] = torch.Size([512, 64])
        with pytest.raises(WeightMismatch, match=r"no parameter model\.norm\.weight"):
            load_rank_into(
                VllmShaped(shapes, torch.float32),
                {"pipeline": "tiny", "url": node.url},
                tp_size=2,
                rank=1,
            )


class FullModeModel(torch.nn.Module):
    """An engine outside the Llama family: takes whole tensors through ``load_weights``."""

    def __init__(self, expected: dict[str, torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        self.received: dict[str, torch.Tensor] = {}
        self.expected = expected

    def load_weights(self, weights: Any) -> set[str]:
        assert not isinstance(weights, (list, tuple, dict)), "an iterator, not a whole model"
        for name, tensor in weights:
            self.received[name] = tensor.clone()
        self.weight.data.fill_(1.0)
        return {"weight"}


def test_full_mode_feeds_load_weights_an_iterator(tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    generator = torch.Generator().manual_seed(5)
    tensors = {
        f"transformer.h.{i}.weight": torch.randn(64, 64, generator=generator) for i in range(6)
    }
    save_file(tensors, str(source / "model.safetensors"))
    (source / "config.json").write_text('{"model_type": "gpt2"}')
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        _warm(c, source, "other", [2])
        model = FullModeModel(tensors)
        report = load_rank_into(
            model, {"pipeline": "other", "url": node.url, "verify": True}, tp_size=2, rank=1
        )
    assert report["mode"] == "full tensors through model.load_weights"
    assert report["bytes_delivered"] == sum(t.nbytes for t in tensors.values())
    assert model.received.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert torch.equal(model.received[name], tensor), name


def test_the_target_is_the_device_of_the_parameters() -> None:
    import inspect

    from loader import vllm_plugin
    from loader.devices import model_device, synchronize
    from loader.errors import LoaderError

    assert model_device(torch.nn.Linear(2, 2)) == torch.device("cpu")
    assert model_device(torch.nn.Linear(2, 2, device="meta")) == torch.device("meta")
    with pytest.raises(LoaderError, match="no parameters"):
        model_device(torch.nn.Module())
    mixed = torch.nn.Module()
    mixed.a = torch.nn.Linear(2, 2)
    mixed.b = torch.nn.Linear(2, 2, device="meta")
    with pytest.raises(LoaderError, match="cpu, meta"):
        model_device(mixed)
    synchronize(torch.device("cpu"))  # nothing to wait for, and no CUDA call
    # the plugin asks the model, never a backend by name
    source = inspect.getsource(vllm_plugin)
    assert "cuda:" not in source
    assert "torch.cuda" not in source


def test_each_engine_of_a_two_model_pipeline_takes_only_its_model(tmp_path: Path) -> None:
    sources = {
        "asr": make_tiny_llama(tmp_path / "asr", num_kv_heads=2, vocab_size=1001, seed=1),
        "llm": make_tiny_llama(tmp_path / "llm", num_kv_heads=4, vocab_size=2003, seed=2),
    }
    body = {
        "models": [{"name": n, "source": f"file://{p}"} for n, p in sources.items()],
        "tp_sizes": [2],
    }
    with running_node(data_dir=tmp_path / "data", capacity="1GiB") as node, node.client() as c:
        assert c.put("/v1/pipelines/two", json=body).status_code == 202
        assert wait_for_state(c, "two", {"warm", "failed"})["state"] == "warm"
        for name, source in sources.items():
            config = json.loads((source / "config.json").read_text())
            expected = _expected_params(
                load_file(str(source / "model.safetensors")), config, 2, 1
            )
            model = VllmShaped({n: t.shape for n, t in expected.items()}, torch.float32)
            options = {"pipeline": "two", "url": node.url, "model": name}
            load_rank_into(model, options, tp_size=2, rank=1)
            params = dict(model.named_parameters())
            for param_name, tensor in expected.items():
                assert torch.equal(params[param_name], tensor), (name, param_name)
        with pytest.raises(ValueError, match=r"has models \['asr', 'llm'\]"):
            load_rank_into(model, {"pipeline": "two", "url": node.url}, tp_size=2, rank=1)
        with pytest.raises(ValueError, match="has no model 'tts'"):
            load_rank_into(
                model, {"pipeline": "two", "url": node.url, "model": "tts"}, tp_size=2, rank=1
            )
