"""Placing a rank's weights into vLLM's parameters (pure torch, no vLLM import).

A weightcache rank shard holds HF-named slices: ``...q_proj.weight`` is this rank's rows of q.
vLLM's Llama-family models fuse some of them: ``qkv_proj`` stacks the rank's q, k and v rows and
``gate_up_proj`` its gate and up rows (vLLM's ``stacked_params_mapping``). Everything else goes
to the parameter of the same name. Vocab-parallel tensors were cut by the sharder in vLLM's own
layout (padded to a multiple of 64, ``Vp/N`` rows per rank), so they too match exactly.

Every destination must match its shard tensor's shape exactly: nothing is zero-filled and
nothing is truncated. A tensor with no parameter, a shape that does not fit, a fused parameter
whose parts do not fill it, or a parameter no tensor fills raises :class:`WeightMismatch` with a
``code`` and both shapes. Dtypes may differ (a bf16 checkpoint into an fp32 engine): like vLLM's
weight loaders (``param.data.copy_(loaded_weight)``), the copy casts.

:func:`plan_destinations` does the placement once, as views into the parameters, so the same
plan serves :func:`copy_rank_weights` (tensors already in memory) and the streaming sink that
writes the rank's bytes straight into the parameters (:mod:`loader.param_sink`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from loader.errors import WeightMismatch

__all__ = [
    "ENGINE_LAYOUT",
    "STACKED_PARAMS",
    "Destination",
    "WeightMismatch",
    "check_all_filled",
    "copy_rank_weights",
    "model_parameters",
    "plan_destinations",
    "vllm_target",
]

#: The shard layout this placement expects (``cache_node.sharding.SHARD_LAYOUT`` on the node):
#: vocab-parallel rows padded to a multiple of 64 and split evenly, as vLLM does.
ENGINE_LAYOUT = "vllm-vocab-pad64"

#: (vLLM fused parameter, HF part, position in the stack), as vLLM's Llama model declares them.
STACKED_PARAMS: tuple[tuple[str, str, int], ...] = (
    ("qkv_proj", "q_proj", 0),
    ("qkv_proj", "k_proj", 1),
    ("qkv_proj", "v_proj", 2),
    ("gate_up_proj", "gate_proj", 0),
    ("gate_up_proj", "up_proj", 1),
)
_PARTS_OF = {
    fused: {index for f, _, index in STACKED_PARAMS if f == fused}
    for fused, _, _ in STACKED_PARAMS
}
#: Checkpoint tensors vLLM's Llama-family ``load_weights`` skips: rotary caches some old
#: checkpoints carry. vLLM computes them; they are buffers, not parameters.
_SKIPPED_BY_VLLM = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


@dataclass(frozen=True)
class Destination:
    """Where one shard tensor goes: ``view`` (a whole parameter or a block of its rows)."""

    name: str
    target: str
    view: torch.Tensor
    row_offset: int | None = None


def vllm_target(name: str) -> tuple[str, str | None, int]:
    """The vLLM parameter an HF-named tensor goes to: (name, fused part or None, stack index)."""
    for fused, part, index in STACKED_PARAMS:
        marker = f".{part}."
        if marker in name:
            return name.replace(marker, f".{fused}."), part, index
    return name, None, 0


def model_parameters(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's parameters by name, and each alias of a shared one (tied ``lm_head``).

    vLLM ties ``lm_head`` to ``embed_tokens`` by sharing one Parameter; ``named_parameters``
    lists it once, under its first name. The aliases map the other names to that one.
    """
    params: dict[str, torch.Tensor] = dict(model.named_parameters())
    first = {id(tensor): name for name, tensor in params.items()}
    aliases = {
        name: first[id(tensor)]
        for name, tensor in model.named_parameters(remove_duplicate=False)
        if name not in params and id(tensor) in first
    }
    return params, aliases


def _shape(shape: Iterable[int]) -> tuple[int, ...]:
    return tuple(int(d) for d in shape)


def plan_destinations(
    params: Mapping[str, torch.Tensor],
    tensors: Iterable[tuple[str, tuple[int, ...]]],
    *,
    aliases: Mapping[str, str] | None = None,
) -> tuple[list[Destination], set[str], list[str]]:
    """Place each ``(name, shape)`` of a rank shard; returns (destinations, filled, skipped).

    ``skipped`` names tensors vLLM itself does not load: rotary caches, and a tied
    ``lm_head.weight`` (an alias of ``embed_tokens.weight``; vLLM skips it when tied).
    Raises :class:`WeightMismatch` for anything that does not fit exactly.
    """
    aliases = aliases or {}
    destinations: list[Destination] = []
    filled: set[str] = set()
    skipped: list[str] = []
    parts: dict[str, dict[int, tuple[str, tuple[int, ...]]]] = {}
    for name, raw_shape in tensors:
        shape = _shape(raw_shape)
        if any(marker in name for marker in _SKIPPED_BY_VLLM):
            skipped.append(name)
            continue
        target, part, index = vllm_target(name)
        if target not in params:
            if target in aliases:
                skipped.append(name)
                continue
            raise WeightMismatch(
                f"{name}: the model has no parameter {target} (shard shape {list(shape)})",
                code="no_parameter",
                tensor=name,
                parameter=target,
            )
        if part is None:
            param = params[target]
            if _shape(param.shape) != shape:
                raise WeightMismatch(
                    f"{name}: shard shape {list(shape)} does not match parameter {target} "
                    f"shape {list(param.shape)}",
                    code="shape_mismatch",
                    tensor=name,
                    parameter=target,
                    shard_shape=list(shape),
                    parameter_shape=list(param.shape),
                )
            if target in filled:
                raise WeightMismatch(
                    f"{name}: parameter {target} is filled twice", code="shape_mismatch"
                )
            destinations.append(Destination(name, target, param))
            filled.add(target)
        else:
            stacked = parts.setdefault(target, {})
            if index in stacked:
                raise WeightMismatch(
                    f"{name}: part {index} of {target} given twice", code="fused_rows"
                )
            stacked[index] = (name, shape)
    for target, stacked in parts.items():
        param = params[target]
        fused = target.rsplit(".", 2)[-2]
        listing = ", ".join(f"{n} {list(s)}" for _, (n, s) in sorted(stacked.items()))
        missing = _PARTS_OF.get(fused, set()) - stacked.keys()
        rows = sum(s[0] if s else 0 for _, s in stacked.values())
        fits = all(len(s) == param.dim() and s[1:] == _shape(param.shape[1:])
                   for _, s in stacked.values())
        if missing or not fits or rows != param.shape[0]:
            raise WeightMismatch(
                f"{target}: its parts ({listing}) do not fill parameter shape "
                f"{list(param.shape)} exactly"
                + (f"; parts {sorted(missing)} are missing" if missing else ""),
                code="fused_rows",
                parameter=target,
                parameter_shape=list(param.shape),
            )
        offset = 0
        for index in sorted(stacked):
            name, shape = stacked[index]
            destinations.append(
                Destination(name, target, param[offset : offset + shape[0]], offset)
            )
            offset += shape[0]
        filled.add(target)
    return destinations, filled, skipped


def check_layout(layout: str | None) -> None:
    """Refuse rank shards the node says were cut by a rule other than :data:`ENGINE_LAYOUT`.

    ``None`` (a node that does not say) is let through: every shape is still checked.
    """
    if layout is not None and layout != ENGINE_LAYOUT:
        raise WeightMismatch(
            f"the rank shards were cut in layout {layout!r}; this vLLM plugin places "
            f"{ENGINE_LAYOUT!r}",
            code="layout",
        )


def check_all_filled(
    model: torch.nn.Module, filled: Iterable[str], *, vllm_exemptions: bool = False
) -> None:
    """Raise ``WeightMismatch(code="unfilled")`` naming every parameter left unfilled.

    Exempt, as in vLLM's ``DefaultModelLoader`` weight tracking: parameters of modules whose
    quantization method quantizes online (``uses_meta_device``) or is a KV-cache scale method
    (``BaseKVCacheMethod``): checkpoints need not carry them. Buffers (rotary caches, attention
    scales) are not parameters and are never checked. A rank shard must fill everything else,
    linear and embedding layers included. ``vllm_exemptions`` applies vLLM's own, looser rule
    for unquantized models (every module with a ``process_weights_after_loading`` method is
    exempt); it is used where ``model.load_weights`` placed the tensors (full-tensor mode), so
    that mode accepts exactly what vLLM's default loader accepts.
    """
    exempt: set[str] = set()
    for module_name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is None:
            continue
        kv_cache = any(cls.__name__ == "BaseKVCacheMethod" for cls in type(method).__mro__)
        processed = vllm_exemptions and hasattr(method, "process_weights_after_loading")
        if getattr(method, "uses_meta_device", False) or kv_cache or processed:
            for param_name, _ in module.named_parameters():
                exempt.add(f"{module_name}.{param_name}" if module_name else param_name)
    names = {name for name, _ in model.named_parameters()}
    unfilled = sorted(names - set(filled) - exempt)
    if unfilled:
        raise WeightMismatch(
            f"{len(unfilled)} parameter(s) of the model are not in this rank's shard: "
            f"{', '.join(unfilled[:10])}{' ...' if len(unfilled) > 10 else ''}",
            code="unfilled",
            parameters=unfilled,
        )


@torch.no_grad()
def copy_rank_weights(
    params: Mapping[str, torch.Tensor],
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    aliases: Mapping[str, str] | None = None,
) -> set[str]:
    """Copy a rank's HF-named slices (already in memory) into vLLM parameters.

    Returns the parameters filled. Parts of a fused parameter are placed one after another
    along dim 0 in stack order, which is how vLLM lays out ``qkv_proj`` (q rows, then k, then
    v) and ``gate_up_proj``. Nothing is copied unless every tensor fits.
    """
    items = list(tensors)
    by_name = dict(items)
    destinations, filled, _ = plan_destinations(
        params, [(name, tuple(t.shape)) for name, t in items], aliases=aliases
    )
    for destination in destinations:
        destination.view.copy_(by_name[destination.name])
    return filled
