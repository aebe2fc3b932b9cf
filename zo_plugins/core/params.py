"""The trainable tensors as the ZO passes see them: names, keys, frozen rows, blocks and the
in-place / out-of-place choice per tensor.

* A tensor's direction key is a hash of its qualified name (``noise.tensor_key``), so it is
  stable across processes and resumes; tensors without a model get ``param_groups.G.I``.
* ``nn.Embedding(padding_idx=...)`` rows are frozen: backprop never updates them.
* Blocks (for block-wise descent) are the tensors sharing the name prefix up to their first
  numeric component -- a transformer layer -- or one tensor outside any layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from .noise import tensor_key
from .passes import ParamSpec
from .rounding import HALF_DTYPES

__all__ = ["model_names", "model_order", "build_group_specs", "build_blocks", "resolve_modes"]


def model_names(model: nn.Module | None) -> tuple[dict[int, str], dict[int, tuple[int, ...]]]:
    """(id -> qualified name, id -> frozen rows) for the parameters of ``model``."""
    names: dict[int, str] = {}
    frozen: dict[int, tuple[int, ...]] = {}
    if model is not None:
        for name, p in model.named_parameters(remove_duplicate=True):
            names.setdefault(id(p), name)
        for mod in model.modules():
            if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
                frozen[id(mod.weight)] = (int(mod.padding_idx) % mod.weight.shape[0],)
    return names, frozen


def build_group_specs(
    params: Sequence[torch.Tensor],
    group_index: int,
    *,
    names: dict[int, str],
    frozen: dict[int, tuple[int, ...]],
    seen: set[int],
    has_model: bool,
) -> list[ParamSpec]:
    """Validated ``ParamSpec`` for one param group (``seen`` collects ids across groups)."""
    out = []
    for pi, p in enumerate(params):
        label = names.get(id(p), f"{group_index}.{pi}")
        if not isinstance(p, torch.Tensor):
            raise TypeError(
                f"ZOOptimizer params must be tensors; got {type(p).__name__} in group {group_index}."
            )
        if not p.is_floating_point():
            raise ValueError(
                f"ZOOptimizer can only train floating-point tensors; parameter {label} has dtype {p.dtype}."
            )
        if p.device.type == "meta":
            raise ValueError(
                f"Parameter {label} is on the meta device: load real weights (e.g. model.to_empty(device=...) "
                "and a state_dict) first."
            )
        if id(p) in seen:
            raise ValueError(f"Parameter {label} appears in more than one param group.")
        seen.add(id(p))
        if has_model and id(p) not in names:
            raise ValueError(
                "A parameter given to ZOOptimizer does not belong to `model`; pass the model that owns "
                "the parameters (or no model)."
            )
        name = names.get(id(p), f"param_groups.{group_index}.{pi}")
        out.append(ParamSpec(p, name, tensor_key(name), frozen.get(id(p), ()), watch_grad=p.requires_grad))
    return out


def model_order(specs: Sequence[ParamSpec], model: nn.Module | None) -> list[ParamSpec]:
    """``specs`` in the model's parameter order (the order the tensors appear in
    ``model.named_parameters()``), whatever param groups they were given in: what is drawn
    per tensor index (``cge`` coordinates, block-wise blocks) must not depend on how a
    framework split the tensors into groups."""
    if model is None:
        return list(specs)
    rank = {name: i for i, (name, _) in enumerate(model.named_parameters(remove_duplicate=True))}
    return sorted(specs, key=lambda s: rank.get(s.name, len(rank)))


def build_blocks(specs: Sequence[ParamSpec]) -> list[list[ParamSpec]]:
    """Blocks for block-wise descent, in first-appearance order of ``specs``."""
    blocks: dict[str, list[ParamSpec]] = {}
    for spec in specs:
        parts = spec.name.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        prefix = ".".join(parts[: idx + 1]) if idx is not None else spec.name
        blocks.setdefault(prefix, []).append(spec)
    return list(blocks.values())


def resolve_modes(
    specs: Sequence[ParamSpec], config: ZOConfig, model: nn.Module | None, *, unperturbed: bool
) -> str:
    """Set ``spec.in_place`` for every tensor and return the optimizer's mode ('in-place',
    'out-of-place' or 'mixed').  ``unperturbed``: the estimator or the sparsity mode needs
    every pass to see the unperturbed weights (forces out of place).

    ``perturbation='auto'``: out of place for every tensor when the model is known (the
    weights are then written only by the update: bit-exact restore in every dtype, and no
    exit from a step can leave them perturbed); in place when only tensors are given (then
    float32/float64 only: half-precision round trips drift 20-150x a MeZO update)."""
    mode = config.perturbation
    halves = [s.name for s in specs if s.param.dtype in HALF_DTYPES]
    if mode == "out-of-place" and model is None:
        raise ValueError(
            "perturbation='out-of-place' needs the model: use ZOOptimizer(model, ...) or "
            "ZOOptimizer(params, ..., model=model)."
        )
    if halves and (mode == "in-place" or model is None):
        raise ValueError(
            f"bf16/fp16 weights (e.g. {halves[0]!r}) cannot be perturbed in place and restored "
            "exactly: a +eps/-2eps/+eps round trip drifts 20-150x the size of a MeZO update. "
            "Pass the model (ZOOptimizer(model, ...)) so they are perturbed out of place, or "
            "keep these weights in float32."
        )
    if config.dropout == "eval" and model is None:
        raise ValueError("dropout='eval' needs the model to switch to eval(): use ZOOptimizer(model, ...).")
    if unperturbed and model is None:
        raise ValueError(
            f"estimator={config.estimator!r} / sparsity_mode={config.sparsity_mode!r} applies perturbations "
            "out of place and needs the model: use ZOOptimizer(model, ...)."
        )
    for spec in specs:
        if unperturbed:
            spec.in_place = False
        elif mode == "auto":
            spec.in_place = model is None
        else:
            spec.in_place = mode == "in-place"
    kinds = {s.in_place for s in specs}
    return "mixed" if len(kinds) == 2 else ("in-place" if True in kinds else "out-of-place")


def describe(specs: Sequence[ParamSpec], limit: int = 3) -> str:
    names = [s.name for s in specs[:limit]]
    return ", ".join(map(repr, names)) + (" and more" if len(specs) > limit else "")


def group_hyper(group: dict[str, Any]) -> tuple[float, float]:
    return float(group["lr"]), float(group.get("weight_decay", 0.0))
