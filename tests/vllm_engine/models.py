"""Tiny random checkpoints a real vLLM engine can run offline: weights, config and a tokenizer.

Each model is a few hundred KiB of float32 safetensors written by ``save_pretrained``, with a
word-level tokenizer built locally (``t0`` ... ``t{V-1}``, one token per id) so the engine needs
no hub access. Head size 32: vLLM's CPU attention kernels do not take the 8-wide heads of the
smaller test fixtures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from tests.fixtures.tiny_llama import make_tiny_llama

HIDDEN = 128
HEADS = 4  # head size 32
INTERMEDIATE = 256
LAYERS = 2


@dataclass(frozen=True, slots=True)
class EngineCase:
    """One checkpoint the engine tests run, and what it stands for."""

    name: str
    family: str  # llama | qwen2 | gpt2
    vocab_size: int
    tie: bool = False
    num_kv_heads: int = 2
    #: the mode the node must pick at TP 2 (what this case exercises in the plugin)
    tp2_mode: str = "sharded"
    hidden_size: int = HIDDEN
    num_heads: int = HEADS
    intermediate_size: int = INTERMEDIATE
    num_layers: int = LAYERS


CASES: tuple[EngineCase, ...] = (
    # 1001 rows: vLLM pads to 1024 and gives each of 2 ranks 512; ceil(1001/2) = 501 is wrong.
    EngineCase("llama-untied", "llama", 1001, tie=False),
    EngineCase("llama-tied", "llama", 1001, tie=True),
    # One KV head, two ranks: both ranks hold (a copy of) the same k and v rows.
    EngineCase("gqa-kv1", "llama", 999, num_kv_heads=1),
    EngineCase("qwen2-bias", "qwen2", 1001),
    # Not a Llama-family layout: the node keeps full tensors and vLLM's weight loaders slice.
    EngineCase("gpt2-full", "gpt2", 1001, tie=True, tp2_mode="full"),
)

#: Big enough (about 300 MB of float32, 150 MB a rank at TP 2) that a second copy of a rank's
#: weights in the worker stands far above the noise of an engine start.
MEMORY_CASE = EngineCase(
    "llama-300mb", "llama", 16001, tie=False, num_kv_heads=4,
    hidden_size=1024, num_heads=16, intermediate_size=2816, num_layers=4,
)


#: Prompt token ids (below every case's vocabulary size) from both halves of a two-rank split.
PROMPTS: tuple[tuple[int, ...], ...] = ((1, 5, 9, 300, 998), (1, 77, 500, 515, 640))


def make_case(case: EngineCase, directory: Path) -> Path:
    """Write ``case``'s checkpoint and tokenizer into ``directory``; returns it."""
    if case.family == "gpt2":
        _make_gpt2(directory, case.vocab_size, seed=len(case.name))
    else:
        make_tiny_llama(
            directory,
            model_type=case.family,
            vocab_size=case.vocab_size,
            tie=case.tie,
            num_kv_heads=case.num_kv_heads,
            hidden_size=case.hidden_size,
            num_heads=case.num_heads,
            intermediate_size=case.intermediate_size,
            num_layers=case.num_layers,
            seed=len(case.name),
        )
    write_tokenizer(directory, case.vocab_size)
    return directory


def _make_gpt2(directory: Path, vocab_size: int, *, seed: int) -> None:
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=128,
        n_embd=HIDDEN,
        n_layer=LAYERS,
        n_head=HEADS,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        # Random everywhere, but layer norms near 1: with wild norms too a tied GPT-2 repeats
        # one token, and outputs that never change could not tell a good load from a bad one.
        for name, param in model.named_parameters():
            if "ln_" in name and name.endswith("weight"):
                param.normal_(1.0, 0.1)
            elif "ln_" in name:
                param.normal_(0.0, 0.1)
            else:
                param.normal_(0.0, 0.3)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)


def write_tokenizer(directory: Path, vocab_size: int) -> None:
    """A word-level tokenizer with exactly ``vocab_size`` tokens ``t0`` ... (``t0`` is unknown)."""
    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.decoder = decoders.WordPiece(prefix="##")  # joins tokens with spaces
    # transformers leaves the tokenizer's __init__ unannotated
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, bos_token="t1", eos_token="t2", unk_token="t0"
    )
    fast.save_pretrained(directory)
