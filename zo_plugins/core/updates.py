"""Update rules: a registry (``UPDATE_RULES``) and the fused passes of the stateful ones.

Each rule names the pass that applies it -- the linear update pass of ``core.passes`` (ZO-SGD,
stateless momentum, conservative) or one of the fused rule passes below (sign, momentum with a
stored buffer, Adam), each one read-modify-write of theta and its state that regenerates every
direction once -- its state size, and for ``zo-sgd-conservative`` the check that accepts or
rejects a step.  Adding a rule is a ``register_update_rule(UpdateRule(...))`` call;
``ZOConfig.optimizer`` accepts every registered name.

ZO-SGD itself, and stateless momentum (a ZO-SGD step along the β-weighted directions of the
last K steps), are linear in the directions and run through ``passes.update_``, which merges
the restore of an in-place perturbation into the same generation.

The estimated gradient of a step is ``d = sum_q c_q z_q`` (``c_q = g_q / n_queries``, or the
ZO-RankSGD weights).  ``zo-sgd-sign`` uses the element-wise ``sign(d)`` -- not, as ZO-Bench's
code does, ``z * sign(g)`` -- so with several directions it is the sign of the averaged
estimate.

``hizoo`` (HiZOO) brings its own pass (``hizoo_update_``): it keeps a diagonal Hessian
estimate ``H`` (one float32 buffer the size of the trainable set), scales the step's probes by
``H^-1/2`` (``ParamSpec.scale``), and in one read-modify-write updates ``H`` from the probed
curvature and ``theta`` along ``H^-1/2 z``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .passes import ParamSpec, Term, _Chunks, _compute_dtype, _flat, _frozen_slices, store_chunk_
from .registry import UPDATE_RULES, UpdateRule, get_update_rule, register_update_rule

__all__ = [
    "RULES",
    "STATE_BYTES_PER_PARAM",
    "UpdateRule",
    "UPDATE_RULES",
    "register_update_rule",
    "get_update_rule",
    "init_state",
    "merge_rule_terms",
    "rule_update_",
]

RULES = ("sign", "momentum", "adam")
STATE_BYTES_PER_PARAM = {
    "zo-sgd": 0,
    "zo-sgd-sign": 0,
    "zo-sgd-conservative": 0,
    "zo-sgd-momentum": 4,
    "zo-adam": 8,
    "hizoo": 4,
}
"""float32 optimizer state per trainable parameter (zo-sgd-momentum with momentum_history > 0: 0)."""


def init_state(rule: str, param: torch.Tensor) -> dict[str, torch.Tensor]:
    dtype = torch.float64 if param.dtype == torch.float64 else torch.float32

    def z() -> torch.Tensor:
        return torch.zeros(param.shape, dtype=dtype, device=param.device)

    if rule == "momentum":
        return {"momentum_buffer": z()}
    if rule == "adam":
        return {"exp_avg": z(), "exp_avg_sq": z()}
    return {}


def merge_rule_terms(
    restore: Sequence[Term], grads: Sequence[Term]
) -> tuple[list[int], dict[int, float], dict[int, float]]:
    """(seeds in first-mention order, restore coefficient per seed, gradient coefficient per
    seed): each direction is generated once per pass, whatever the number of terms naming it."""
    r_coef: dict[int, float] = {}
    g_coef: dict[int, float] = {}
    for s, c in restore:
        r_coef[s] = r_coef.get(s, 0.0) + c
    for s, c in grads:
        g_coef[s] = g_coef.get(s, 0.0) + c
    return list(dict.fromkeys(list(r_coef) + list(g_coef))), r_coef, g_coef


def rule_update_(
    spec: ParamSpec,
    *,
    rule: str,
    restore: Sequence[Term],
    grads: Sequence[Term],
    lr: float,
    weight_decay: float,
    state: dict[str, torch.Tensor],
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    adam_step: int = 1,
    distribution: str,
    chunk_size: int,
    round_seed: int | None = None,
) -> None:
    """``x = theta + sum(restore)``; ``d = sum(grads)``; then per ``rule``:
    sign: ``theta = x - lr (sign(d) + wd x)``; momentum: ``m = momentum m + d``,
    ``theta = x - lr (m + wd x)``; adam: bias-corrected Adam step on ``d`` with decoupled
    weight decay.  Frozen rows and elements outside the sparsity mask keep their bits."""
    if rule not in RULES:
        raise ValueError(f"unknown update rule {rule!r}")
    chunks = _Chunks(chunk_size, distribution)
    flat = _flat(spec.param)
    cdt = _compute_dtype(flat)
    seeds, r_coef, g_coef = merge_rule_terms(restore, grads)
    st = {k: v.view(-1) for k, v in state.items()}
    with torch.no_grad():
        for start, n in chunks.ranges(flat.numel()):
            cur = flat[start : start + n]
            keep = None if spec.mask is None else ~spec.mask(start, n)
            x = cur.to(cdt, copy=True)
            d = torch.zeros(n, dtype=cdt, device=cur.device)
            for seed in seeds:
                z = chunks.direction(spec, seed, start, n)
                if r_coef.get(seed):
                    x.add_(z, alpha=r_coef[seed])
                if g_coef.get(seed):
                    d.add_(z, alpha=g_coef[seed])
            if rule == "sign":
                step_dir = d.sign_()
            elif rule == "momentum":
                m = st["momentum_buffer"][start : start + n]
                m.mul_(momentum).add_(d)
                step_dir = m
            else:
                b1, b2 = betas
                m, v = st["exp_avg"][start : start + n], st["exp_avg_sq"][start : start + n]
                m.mul_(b1).add_(d, alpha=1 - b1)
                v.mul_(b2).addcmul_(d, d, value=1 - b2)
                denom = (v / (1 - b2**adam_step)).sqrt_().add_(adam_eps)
                step_dir = (m / (1 - b1**adam_step)).div_(denom)
            if weight_decay:
                x.mul_(1 - lr * weight_decay)
            x.add_(step_dir, alpha=-lr)
            store_chunk_(spec, cur, x, start=start, keep=keep, round_seed=round_seed)


# ----------------------------------------------------------------------------- hizoo
def hizoo_update_(
    spec: ParamSpec,
    *,
    restore: Sequence[Term],
    seeds: Sequence[int],
    grads: Sequence[float],
    curvatures: Sequence[float],
    lr: float,
    weight_decay: float,
    hessian: torch.Tensor,
    smooth: float,
    estimate: str,
    distribution: str,
    chunk_size: int,
    round_seed: int | None = None,
) -> None:
    """HiZOO's update in one read-modify-write pass.  With ``m = len(seeds)`` directions
    ``z_q`` and, from the probes at ``theta ± ε H^-1/2 z_q``, ``g_q`` and ``c_q = ΔL_q/(2ε²)``:

    * ``x = theta + sum(restore)`` (restore terms along ``H^-1/2 z``, as the probes were);
    * ``Ĥ = mean_q c_q H (z_q² - 1)`` ('paper') or ``mean_q |c_q| H z_q²`` ('code');
    * ``H' = (1 - smooth) H + smooth |Ĥ|`` on the perturbed elements;
    * ``theta = x - lr (mean_q g_q z_q H'^-1/2 + wd x)``.

    Frozen rows and elements outside the sparsity mask keep their bits and their ``H``."""
    chunks = _Chunks(chunk_size, distribution)
    flat = _flat(spec.param)
    cdt = _compute_dtype(flat)
    hflat = hessian.view(-1)
    r_coef: dict[int, float] = {}
    for seed, coeff in restore:
        r_coef[seed] = r_coef.get(seed, 0.0) + coeff
    order = list(dict.fromkeys(list(seeds) + list(r_coef)))
    m = len(seeds)
    with torch.no_grad():
        for start, n in chunks.ranges(flat.numel()):
            cur = flat[start : start + n]
            on = torch.ones(n, dtype=torch.bool, device=cur.device)
            for sl in _frozen_slices(spec, start, n):
                on[sl] = False
            keep = None
            if spec.mask is not None:  # before cur changes: a magnitude mask reads the weights
                inside = spec.mask(start, n)
                on &= inside
                keep = ~inside
            h = hflat[start : start + n]
            hc = h.to(cdt)
            x = cur.to(cdt, copy=True)
            probe_scale = hc.rsqrt()  # what this step's probes used: H^-1/2
            h_hat = torch.zeros(n, dtype=cdt, device=cur.device)
            d = torch.zeros(n, dtype=cdt, device=cur.device)
            for seed in order:
                z = chunks.direction(spec, seed, start, n, scaled=False).to(cdt)
                if r_coef.get(seed):
                    x.add_(z * probe_scale, alpha=r_coef[seed])
                if seed not in seeds:
                    continue
                q = seeds.index(seed)
                zz = z * z
                if estimate == "paper":
                    h_hat.add_(hc * (zz - 1.0), alpha=curvatures[q] / m)
                else:
                    h_hat.add_(hc * zz, alpha=abs(curvatures[q]) / m)
                d.add_(z, alpha=grads[q] / m)
            h_new = torch.where(on, hc * (1.0 - smooth) + h_hat.abs_() * smooth, hc)
            if weight_decay:
                x.mul_(1 - lr * weight_decay)
            x.addcmul_(d, h_new.rsqrt(), value=-lr)
            h.copy_(h_new)
            store_chunk_(spec, cur, x, start=start, keep=keep, round_seed=round_seed)


def _hizoo_scale(opt: Any, spec: ParamSpec):
    """The probes' factor H^-1/2 (None before the first update: H = 1)."""
    h = opt.state.get(spec.param, {}).get("hessian")
    if h is None:
        return None
    flat = h.view(-1)
    return lambda start, n: flat[start : start + n].rsqrt()


def _hizoo_apply(opt: Any, plan: Any, grads: Sequence[float], restore: Sequence[Term], groups) -> None:
    cfg = opt.config
    m = len(plan.seeds)
    for lr, wd, specs in groups:
        for spec in specs:
            state = opt.state[spec.param]
            if "hessian" not in state:
                dtype = torch.float64 if spec.param.dtype == torch.float64 else torch.float32
                state["hessian"] = torch.ones(spec.param.shape, dtype=dtype, device=spec.param.device)
                state["step"] = 0
            state["step"] += 1
            hizoo_update_(
                spec,
                restore=restore if spec.in_place else [],
                seeds=plan.seeds,
                grads=grads[:m],
                curvatures=grads[m:],
                lr=lr,
                weight_decay=wd,
                hessian=state["hessian"],
                smooth=cfg.hessian_smooth,
                estimate=cfg.hessian_estimate,
                distribution=plan.stream,
                chunk_size=plan.chunk_size,
                round_seed=plan.round_seed,
            )


def _hizoo_validate(cfg: Any) -> None:
    if cfg.estimator != "hizoo":
        raise ValueError(
            "optimizer='hizoo' learns its Hessian from HiZOO's three probes: use estimator='hizoo', "
            f"not {cfg.estimator!r}."
        )
    if cfg.distribution != "gaussian":
        why = (
            "has z_i^2 = 1 and carries no diagonal information"
            if cfg.distribution == "rademacher"
            else "is rescaled every step"
        )
        raise ValueError(
            "optimizer='hizoo' estimates the diagonal from z_i^2 of Gaussian directions; "
            f"distribution={cfg.distribution!r} {why}: use distribution='gaussian'."
        )
    if cfg.backend == "triton":
        raise ValueError("optimizer='hizoo' runs on the PyTorch passes: use backend='auto' or 'torch'.")


# ----------------------------------------------------------------------------- the registry
def _conservative_accept(
    opt: Any, plan: Any, grads: Sequence[float], probe: Any, baseline: float | None
) -> bool:
    """ZO-Bench's conservative rule: probe the loss at the updated weights (out of place the
    weights are not written; in place the candidate becomes the current weights until the
    update or the restore) and reject the update if it is worse than ``baseline``."""
    if probe is None or baseline is None or not math.isfinite(baseline):
        return True  # nothing to compare with: take the step
    lrs = {float(g["lr"]) for g in opt.param_groups}
    if len(lrs) != 1:
        raise ValueError("optimizer='zo-sgd-conservative' needs one learning rate for all param groups.")
    lr = lrs.pop()
    new = opt.probe_loss(plan, plan.terms([-lr * g / len(grads) for g in grads]), probe)
    from .distributed import all_reduce_mean

    new, baseline = all_reduce_mean([new, baseline], opt.config)  # every rank takes the same decision
    sign = -1.0 if opt.config.maximize else 1.0
    return math.isfinite(new) and sign * new <= sign * baseline


register_update_rule(UpdateRule("zo-sgd", lambda cfg: None, lambda cfg: 0, help="θ -= lr (d + wd θ)"))
register_update_rule(
    UpdateRule(
        "zo-sgd-momentum",
        lambda cfg: "momentum" if cfg.momentum_history == 0 else None,
        lambda cfg: 4 if cfg.momentum_history == 0 else 0,
        help="m = β m + d; θ -= lr (m + wd θ) (stored buffer, or rebuilt from the last K steps)",
    )
)
register_update_rule(
    UpdateRule("zo-sgd-sign", lambda cfg: "sign", lambda cfg: 0, help="θ -= lr (sign(d) + wd θ)")
)
register_update_rule(
    UpdateRule(
        "zo-sgd-conservative",
        lambda cfg: None,
        lambda cfg: 0,
        accept=_conservative_accept,
        help="ZO-SGD, the step kept only if the loss at the updated weights is not worse",
    )
)
register_update_rule(
    UpdateRule("zo-adam", lambda cfg: "adam", lambda cfg: 8, help="Adam moments on d, decoupled weight decay")
)
register_update_rule(
    UpdateRule(
        "hizoo",
        lambda cfg: None,
        lambda cfg: 4,
        apply=_hizoo_apply,
        direction_scale=_hizoo_scale,
        validate=_hizoo_validate,
        help="HiZOO: diagonal Hessian H (4 bytes/parameter) preconditions probes and step, θ -= lr g H^-1/2 z",
    )
)
