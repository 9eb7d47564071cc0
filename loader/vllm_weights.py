"""Placing a rank's weights into vLLM's parameters (pure torch, no vLLM import).

A weightcache rank shard holds HF-named slices: ``...q_proj.weight`` is this rank's rows of q.
vLLM's Llama-family models fuse some of them: ``qkv_proj`` stacks the rank's q, k and v rows and
``gate_up_proj`` its gate and up rows (vLLM's ``stacked_params_mapping``). Vocab-parallel tensors
may have more rows in vLLM (it pads the vocabulary to a multiple of 64 before splitting); the
extra rows are zeroed. Everything else is copied by name.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

#: (vLLM fused parameter, HF part, position in the stack), as vLLM's Llama model declares them.
STACKED_PARAMS: tuple[tuple[str, str, int], ...] = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_VOCAB_PARALLEL = ("embed_tokens.weight", "lm_head.weight")


class WeightMismatch(ValueError):
    """A shard tensor has no home in the model, or does not fit it."""


def vllm_target(name: str) -> tuple[str, str | None, int]:
    """The vLLM parameter an HF-named tensor goes to: (name, fused part or None, stack index)."""
    for fused, part, index in STACKED_PARAMS:
        marker = f".{part}."
        if marker in name:
            return name.replace(marker, f".{fused}."), part, index
    return name, None, 0


@torch.no_grad()
def copy_rank_weights(
    params: Mapping[str, torch.Tensor], tensors: Iterable[tuple[str, torch.Tensor]]
) -> set[str]:
    """Copy a rank's HF-named slices into vLLM parameters; returns the parameters filled.

    Parts of a fused parameter are placed one after another along dim 0 in stack order, which
    is how vLLM lays out ``qkv_proj`` (q rows, then k, then v) and ``gate_up_proj``.
    """
    parts: dict[str, dict[int, torch.Tensor]] = {}
    filled: set[str] = set()
    for name, tensor in tensors:
        target, part, index = vllm_target(name)
        if target not in params:
            raise WeightMismatch(f"{name}: the model has no parameter {target}")
        if part is None:
            _copy_whole(name, params[target], tensor)
            filled.add(target)
        else:
            parts.setdefault(target, {})[index] = tensor
    for target, pieces in parts.items():
        param = params[target]
        offset = 0
        for index in sorted(pieces):
            piece = pieces[index]
            rows = piece.shape[0]
            if offset + rows > param.shape[0] or piece.shape[1:] != param.shape[1:]:
                raise WeightMismatch(
                    f"{target}: part {index} of shape {tuple(piece.shape)} does not fit "
                    f"{tuple(param.shape)} at row {offset}"
                )
            param[offset : offset + rows].copy_(piece, non_blocking=True)
            offset += rows
        if offset != param.shape[0]:
            raise WeightMismatch(f"{target}: parts fill {offset} of {param.shape[0]} rows")
        filled.add(target)
    return filled


def _copy_whole(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if param.shape == tensor.shape:
        param.copy_(tensor, non_blocking=True)
        return
    padded = name.endswith(_VOCAB_PARALLEL) and param.dim() == 2
    if padded and param.shape[1:] == tensor.shape[1:] and param.shape[0] >= tensor.shape[0]:
        param[: tensor.shape[0]].copy_(tensor, non_blocking=True)
        param[tensor.shape[0] :].zero_()
        return
    raise WeightMismatch(
        f"{name}: shard shape {tuple(tensor.shape)} does not match {tuple(param.shape)}"
    )
