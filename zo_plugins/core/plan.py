"""The step plan: everything about optimizer step ``t`` that does not depend on the batch,
computed once per step and shared by every pass and micro-batch of that step.

* the direction seeds, one per query (a pure function of the base seed and ``t``);
* the active tensors (all trainable tensors, or one block under block-wise descent; tensors
  whose ``requires_grad`` was turned off since the optimizer was built are left out, as
  backprop would leave them without a gradient);
* the sparsity masks (Sparse MeZO's magnitude thresholds are estimated here, from the
  unperturbed weights, once -- not once per pass);
* the sphere scales of ``distribution='sphere'`` (one generation pass per direction);
* the passes that honour this step's masks, and the stochastic-rounding seed;
* ``extra``: estimator-specific per-step data (e.g. the coordinates of ``cge``), computed by
  the estimator on first use and cached here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ZOConfig
from .backend import Passes
from .noise import mix64, step_seed
from .passes import ParamSpec, _Chunks, _frozen_slices
from .sparsity import sparsity_mask

__all__ = ["StepPlan", "make_plan", "step_seeds"]


def step_seeds(config: ZOConfig, step: int) -> list[int]:
    """Direction seeds of optimizer step ``step``, one per query."""
    base = step_seed(config.seed, step)
    return [base if q == 0 else mix64(base, q) for q in range(config.n_queries)]


@dataclass
class StepPlan:
    """What optimizer step ``step`` perturbs and how (see the module docstring)."""

    step: int
    seeds: list[int]
    active: list[ParamSpec]
    passes: Passes
    stream: str
    chunk_size: int
    round_seed: int | None
    scales: dict[int, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def coef(self, seed: int) -> float:
        """The factor turning the stream's ``z(seed)`` into this step's direction (1 except
        for distribution='sphere')."""
        return self.scales.get(seed, 1.0)

    def terms(self, coeffs: Sequence[float]) -> list[tuple[int, float]]:
        """``sum_q coeffs[q] * direction_q`` as (seed, coefficient) terms of the stream."""
        return [(s, c * self.coef(s)) for s, c in zip(self.seeds, coeffs)]

    def query_of(self, seed: int) -> int:
        try:
            return self.seeds.index(seed)
        except ValueError:
            raise RuntimeError("internal: a perturbation seed outside the current step") from None

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        if key not in self.extra:
            self.extra[key] = build()
        return self.extra[key]


def make_plan(
    step: int,
    *,
    config: ZOConfig,
    specs: Sequence[ParamSpec],
    blocks: Sequence[Sequence[ParamSpec]],
    passes_for: Callable[[Sequence[ParamSpec]], Passes],
    stream: str,
    mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None,
    thresholds: dict[str, float] | None = None,
) -> StepPlan:
    """Build the plan of step ``step`` (sets each spec's ``mask`` for the step).  ``thresholds``
    holds the run's magnitude thresholds under ``sparsity_threshold='initial'`` (filled on first
    use, checkpointed by the optimizer)."""
    cfg = config
    seeds = step_seeds(cfg, step)
    if cfg.block_wise is not None:
        nb = len(blocks)
        b = step % nb if cfg.block_wise == "cycle" else mix64(cfg.seed, step, 0xB10C) % nb
        active = list(blocks[b])
    else:
        active = list(specs)
    active = [
        s for s in active if (s.param if s.source is None else s.source).requires_grad or not s.watch_grad
    ]
    for spec in specs:
        spec.mask = sparsity_mask(spec, cfg, step, thresholds) if cfg.sparsity else None
        if mask_fn is not None:
            spec.mask = user_mask(mask_fn, spec, step, spec.mask)
    round_seed = mix64(seeds[0], 0x5D) if cfg.stochastic_rounding else None
    plan = StepPlan(step, seeds, active, passes_for(specs), stream, cfg.chunk_size, round_seed)
    if cfg.distribution == "sphere":
        plan.scales = sphere_scales(plan)
    return plan


def sphere_scales(plan: StepPlan) -> dict[int, float]:
    """distribution='sphere': ``sqrt(D) / ||z(seed)||`` per seed, with ``z`` the Gaussian
    direction over the D coordinates this step perturbs (frozen rows and masked elements
    excluded), so ``scale * z`` is uniform on the sphere of radius sqrt(D).  One extra
    generation pass per direction; nothing is stored."""
    chunks = _Chunks(plan.chunk_size, plan.stream)
    out = {}
    for seed in plan.seeds:
        sq, count = 0.0, 0
        for spec in plan.active:
            for start, n in chunks.ranges(spec.param.numel()):
                z = chunks.direction(spec, seed, start, n)
                sq += float(z.double().square().sum())
                on = torch.ones(n, dtype=torch.bool, device=z.device)
                for sl in _frozen_slices(spec, start, n):
                    on[sl] = False
                if spec.mask is not None:
                    on &= spec.mask(start, n)
                count += int(on.sum())
        out[seed] = math.sqrt(count / sq) if sq > 0 else 0.0
    return out


def user_mask(fn, spec: ParamSpec, step: int, inner):
    """The mask of ``mask_fn(name, param, step)`` (True = perturbed and updated), combined
    with the sparsity mask ``inner``."""
    m = fn(spec.name, spec.param, step)
    if m is None:
        return inner
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != spec.param.shape:
        raise ValueError(
            f"mask_fn must return a bool tensor of shape {tuple(spec.param.shape)} (or None) for "
            f"{spec.name!r}; got {type(m).__name__} {getattr(m, 'dtype', '')} {tuple(getattr(m, 'shape', ()))}."
        )
    flat = m.to(spec.param.device).reshape(-1)

    def mask(start: int, n: int) -> torch.Tensor:
        own = flat[start : start + n]
        return own if inner is None else own & inner(start, n)

    return mask
