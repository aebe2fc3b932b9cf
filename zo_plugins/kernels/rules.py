"""Stateful update rules in one fused Triton pass: ZO-SGD-Sign, ZO-SGD with a momentum buffer,
and ZO-Adam.

The same arithmetic as ``zo_plugins.core.updates.rule_update_`` (the PyTorch path): a program
reads theta and the rule's float32 state once, regenerates every direction of the step in
registers, forms

    x = theta + sum(restore_k * z_k)          (undo an in-place perturbation)
    d = sum(grad_k * z_k)                     (the estimated gradient, zero on frozen rows)

and then, per rule,

    sign:      theta = x * (1 - lr*wd) - lr * sign(d)
    momentum:  m = momentum * m + d;          theta = x * (1 - lr*wd) - lr * m
    adam:      m = b1 m + (1-b1) d;  v = b2 v + (1-b2) d^2
               theta = x * (1 - lr*wd) - lr * (m / (1-b1^t)) / (sqrt(v / (1-b2^t)) + eps)

writing theta (rounded to nearest even, or stochastically for bf16/fp16) and the state once.
Frozen rows keep their bits; their state decays as on the PyTorch path (d is zero there).
Operations are done in the PyTorch path's order and rounding: an explicit ``fma`` where
PyTorch's ``add_(..., alpha=)`` fuses, no other contraction, correctly rounded division and
square root (``div_rn``, ``sqrt_rn``).

Many tensors share one launch (one int64 metadata table per launch, as in ``passes.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import triton
import triton.language as tl

from ..core.noise import SR_SALT, philox_keys
from ..core.passes import ParamSpec
from ..core.updates import merge_rule_terms
from .passes import (
    _DTYPE_CODE,
    _auto_block,
    _check,
    _f32_bits,
    _frozen_ranges,
    _group,
    _thresholds,
    _tile_tables,
)
from .philox import direction_tile, round_to_half, round_words_tile

__all__ = ["RULE_CODES", "triton_rule_update_foreach_"]

RULE_CODES = {"sign": 0, "momentum": 1, "adam": 2}
Term = tuple[int, float]

# Columns of the per-tensor int64 metadata table.
_THETA, _M, _V, _NUMEL, _BC1, _BC2, _RKEY, _THRESH, _KEYS = range(9)


@triton.jit
def _zo_rule_kernel(
    tile_tensor_ptr,
    tile_start_ptr,
    meta_ptr,
    meta_w,
    scal_ptr,  # float32 [8]: 1 - lr*wd, -lr, momentum / b1, 1 - b1, b2, 1 - b2, adam eps, unused
    K: tl.constexpr,  # directions of the step (restore and gradient coefficients per direction)
    F: tl.constexpr,
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,
    DTYPE: tl.constexpr,
    RULE: tl.constexpr,  # 0 sign, 1 momentum, 2 adam
    DECAY: tl.constexpr,
    MASKED: tl.constexpr,
    RESTORE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    start = tl.load(tile_start_ptr + pid)
    row = meta_ptr + t * meta_w
    theta_addr = tl.load(row + 0)
    numel = tl.load(row + 3)
    if DTYPE == 0:
        theta_ptr = theta_addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        theta_ptr = theta_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        theta_ptr = theta_addr.to(tl.pointer_type(tl.float16))

    rows = tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, GROUP).to(tl.int64)
    local = start + rows[:, None] * GROUP + cols[None, :]
    inb = local < numel
    theta = tl.load(theta_ptr + local, mask=inb, other=0.0)
    x = theta.to(tl.float32)

    active = inb
    for f in tl.static_range(F):
        lo = tl.load(row + 8 + 3 * K + 2 * f)
        hi = tl.load(row + 9 + 3 * K + 2 * f)
        active = active & ((local < lo) | (local >= hi))
    if MASKED:  # Sparse MeZO: only |theta| < threshold is perturbed and updated
        thresh = tl.load(row + 7).to(tl.int32).to(tl.float32, bitcast=True)
        active = active & (tl.abs(x) < thresh)

    first_counter = start // GROUP
    # d starts at +0 as PyTorch's zero buffer does.  No tl.zeros: it is a standard-library
    # @jit function whose interpretedness is fixed when triton is first imported, so under
    # TRITON_INTERPRET it breaks if anything imported triton before the variable was set.
    d = (local * 0).to(tl.float32)
    for k in tl.static_range(K):
        key = tl.load(row + 8 + k)
        z = direction_tile(first_counter, key, ROWS, GROUP)
        z = tl.where(active, z, 0.0)
        if RESTORE:
            rc = tl.load(row + 8 + K + k).to(tl.int32).to(tl.float32, bitcast=True)
            x = tl.fma(z, rc, x)
        gc = tl.load(row + 8 + 2 * K + k).to(tl.int32).to(tl.float32, bitcast=True)
        d = tl.fma(z, gc, d)

    scale = tl.load(scal_ptr + 0)
    neg_lr = tl.load(scal_ptr + 1)
    if RULE == 0:
        step = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif RULE == 1:
        m_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + local, mask=inb, other=0.0)
        m = m * tl.load(scal_ptr + 2) + d
        tl.store(m_ptr + local, m, mask=inb)
        step = m
    else:
        m_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        v_ptr = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        m = tl.load(m_ptr + local, mask=inb, other=0.0)
        v = tl.load(v_ptr + local, mask=inb, other=0.0)
        m = tl.fma(d, tl.load(scal_ptr + 3), m * tl.load(scal_ptr + 2))
        v = tl.fma(tl.load(scal_ptr + 5) * d, d, v * tl.load(scal_ptr + 4))  # as addcmul_ rounds
        tl.store(m_ptr + local, m, mask=inb)
        tl.store(v_ptr + local, v, mask=inb)
        bc1 = tl.load(row + 4).to(tl.int32).to(tl.float32, bitcast=True)
        bc2 = tl.load(row + 5).to(tl.int32).to(tl.float32, bitcast=True)
        denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + tl.load(scal_ptr + 6)
        step = tl.div_rn(tl.div_rn(m, bc1), denom)
    if DECAY:
        x = x * scale
    x = tl.fma(step, neg_lr, x)

    if DTYPE == 0:
        new = x
    else:
        if STOCHASTIC:
            words = round_words_tile(start, tl.load(row + 6), ROWS, GROUP)
        else:
            words = x.to(tl.uint32, bitcast=True)  # unused
        new = round_to_half(x, words, DTYPE == 2, STOCHASTIC).to(theta.dtype)
    tl.store(theta_ptr + local, new, mask=active)


def _f32(v: float) -> float:
    return float(np.float32(v))


def triton_rule_update_foreach_(
    specs: Sequence[ParamSpec],
    *,
    rule: str,
    restore: Sequence[Term],
    grads: Sequence[Term],
    lr: float,
    weight_decay: float,
    states: Sequence[dict[str, torch.Tensor]],
    steps: Sequence[int] | None = None,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    distribution: str,
    chunk_size: int | None = None,
    round_seed: int | None = None,
    magnitude_threshold: float | Sequence[float | None] | None = None,
    block: int | None = None,
) -> None:
    """``core.updates.rule_update_`` for a whole param group, one launch per dtype.

    ``states[i]`` holds spec ``i``'s float32 state (``momentum_buffer``; ``exp_avg`` and
    ``exp_avg_sq``), updated in place; ``steps[i]`` is its Adam step count (bias correction).
    ``restore`` applies to the specs perturbed in place (``spec.in_place``);
    ``magnitude_threshold`` (one value or one per spec) restricts the update to
    ``|theta| < threshold`` (Sparse MeZO), the other elements' weights keep their bits."""
    del chunk_size
    if rule not in RULE_CODES:
        raise ValueError(f"rule={rule!r} is not one of {tuple(RULE_CODES)}.")
    if len(states) != len(specs):
        raise ValueError(f"{len(states)} states for {len(specs)} tensors.")
    steps = list(steps) if steps is not None else [1] * len(specs)
    group = _group(distribution)
    need = {"sign": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}[rule]
    seeds, r_coef, g_coef = merge_rule_terms(restore, grads)
    K = len(seeds)
    b1, b2 = betas
    first = momentum if rule == "momentum" else b1
    scal = np.array(
        [1.0 - lr * weight_decay, -lr, first, 1.0 - b1, b2, 1.0 - b2, adam_eps, 0.0], dtype=np.float32
    )
    thr = _thresholds(len(specs), magnitude_threshold)
    buckets: dict[tuple[torch.dtype, bool, bool], list[int]] = {}
    for i, spec in enumerate(specs):
        _check(spec.param, spec.name)
        for name in need:
            st = states[i].get(name)
            if st is None or st.dtype != torch.float32 or st.shape != spec.param.shape or not st.is_contiguous():
                raise ValueError(
                    f"{spec.name}: the {rule} rule needs a contiguous float32 state {name!r} of shape "
                    f"{tuple(spec.param.shape)}."
                )
        if spec.param.numel():
            key = (spec.param.dtype, bool(r_coef) and spec.in_place, thr[i] is not None)
            buckets.setdefault(key, []).append(i)
    if not buckets:
        return
    device = specs[0].param.device
    scal_t = torch.from_numpy(scal).to(device)
    for (dtype, with_restore, masked), idx in buckets.items():
        gspecs = [specs[i] for i in idx]
        frozen = [_frozen_ranges(s) for s in gspecs]
        F = max(len(f) for f in frozen)
        width = 8 + 3 * K + 2 * F
        meta = np.zeros((len(idx), width), dtype=np.int64)
        meta[:, _THETA] = [s.param.data_ptr() for s in gspecs]
        if need:
            meta[:, _M] = [states[i][need[0]].data_ptr() for i in idx]
        if rule == "adam":
            meta[:, _V] = [states[i]["exp_avg_sq"].data_ptr() for i in idx]
            meta[:, _BC1] = [_f32_bits(1.0 - b1 ** steps[i]) for i in idx]
            meta[:, _BC2] = [_f32_bits(1.0 - b2 ** steps[i]) for i in idx]
        meta[:, _NUMEL] = [s.param.numel() for s in gspecs]
        meta[:, _THRESH] = [_f32_bits(thr[i] if masked else np.inf) for i in idx]
        keys = [s.key for s in gspecs]
        stochastic = round_seed is not None and dtype != torch.float32
        if stochastic:
            meta[:, _RKEY] = philox_keys(round_seed, keys, salt=SR_SALT)
        for k, seed in enumerate(seeds):
            meta[:, _KEYS + k] = philox_keys(seed, keys)
            meta[:, _KEYS + K + k] = _f32_bits(r_coef.get(seed, 0.0))
            meta[:, _KEYS + 2 * K + k] = _f32_bits(g_coef.get(seed, 0.0))
        for t, fr in enumerate(frozen):
            for f, (lo, hi) in enumerate(fr):
                meta[t, _KEYS + 3 * K + 2 * f : _KEYS + 3 * K + 2 * f + 2] = (lo, hi)
        gblock = block or _auto_block(group, max(s.param.numel() for s in gspecs))
        if gblock < group or gblock & (gblock - 1):
            raise ValueError(f"block={gblock} must be a power of two >= {group} for {distribution} directions.")
        tile_tensor, tile_start = _tile_tables(device, gblock, tuple((s.param.numel(), 0) for s in gspecs))
        with torch.no_grad():
            _zo_rule_kernel[(tile_tensor.numel(),)](
                tile_tensor,
                tile_start,
                torch.from_numpy(meta).to(device),
                width,
                scal_t,
                K=K,
                F=F,
                ROWS=gblock // group,
                GROUP=group,
                DTYPE=_DTYPE_CODE[dtype],
                RULE=RULE_CODES[rule],
                DECAY=weight_decay != 0.0,
                MASKED=masked,
                RESTORE=with_restore,
                STOCHASTIC=stochastic,
                num_warps=4,
                enable_fp_fusion=False,
            )
