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

Many tensors share one launch (one int64 table per launch, copied from pinned memory, and the
same tiles, vector path and bisection as ``passes.py``); the rule's scalars are kernel
arguments, so a launch uploads nothing else.
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
    _RUNTIME_INTS,
    VECTOR_BYTES,
    Launch,
    _aligned,
    _block,
    _check,
    _f32_bits,
    _frozen_ranges,
    _group,
    _interpreting,
    _launch,
    _search_steps,
    _tail_split,
    _thresholds,
    _tiling,
    tile_width,
)
from .philox import (
    direction_tile,
    find_tensor,
    in_bounds,
    in_ranges,
    round_to_half,
    round_words_tile,
    tile_offsets,
    zero_bits,
)

__all__ = ["RULE_CODES", "triton_rule_update_foreach_"]

RULE_CODES = {"sign": 0, "momentum": 1, "adam": 2}
Term = tuple[int, float]

# Columns of the per-tensor int64 table of a rule launch.
_THETA: tl.constexpr = tl.constexpr(0)
_M: tl.constexpr = tl.constexpr(1)  # momentum buffer / exp_avg
_V: tl.constexpr = tl.constexpr(2)  # exp_avg_sq
_NUMEL: tl.constexpr = tl.constexpr(3)
_BC1: tl.constexpr = tl.constexpr(4)  # float32 bits of 1 - beta1**t
_BC2: tl.constexpr = tl.constexpr(5)  # float32 bits of 1 - beta2**t
_RKEY: tl.constexpr = tl.constexpr(6)
_THRESH: tl.constexpr = tl.constexpr(7)
_FIRST: tl.constexpr = tl.constexpr(8)  # the tensor's first program
_KEYS: tl.constexpr = tl.constexpr(9)  # K keys, K restore and K gradient coefficient bits, 2F frozen bounds


@triton.jit
def _rule_tile(
    theta_ptr,
    m_ptr,
    v_ptr,
    row,
    local0,
    numel,
    K,
    F,
    scale,
    neg_lr,
    beta1,  # momentum (momentum rule) or beta1 (adam)
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    adam_eps,
    BLOCK: tl.constexpr,
    WIDTH: tl.constexpr,
    VEC: tl.constexpr,
    DTYPE: tl.constexpr,
    RULE: tl.constexpr,
    DECAY: tl.constexpr,
    MASKED: tl.constexpr,
    FROZEN: tl.constexpr,
    RESTORE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HW_ROUND: tl.constexpr,
    EVEN: tl.constexpr,
):
    ROWS: tl.constexpr = BLOCK // WIDTH
    off = tile_offsets(ROWS, WIDTH, VEC)
    tp = theta_ptr + local0
    mp = m_ptr + local0
    vp = v_ptr + local0
    if EVEN:
        if ALIGNED:  # the host checked: 16-byte aligned
            tp = tl.multiple_of(tp, 16)
            mp = tl.multiple_of(mp, 16)
            vp = tl.multiple_of(vp, 16)
        theta = tl.load(tp + off)
    else:
        inb = in_bounds(off, local0, numel, BLOCK)
        theta = tl.load(tp + off, mask=inb, other=0.0)
    x = theta.to(tl.float32)

    # elements that keep their weight: frozen rows, and outside a Sparse MeZO magnitude mask
    if FROZEN:
        keep = in_ranges(off, x, local0, row + _KEYS + 3 * K, F, BLOCK)
        if MASKED:
            thresh = tl.load(row + _THRESH).to(tl.int32).to(tl.float32, bitcast=True)
            keep = keep | ~(tl.abs(x) < thresh)
    elif MASKED:
        thresh = tl.load(row + _THRESH).to(tl.int32).to(tl.float32, bitcast=True)
        keep = ~(tl.abs(x) < thresh)

    if WIDTH == 128:
        first_counter = local0 // 128
    else:
        first_counter = local0 // 4
    d = zero_bits(x).to(tl.float32, bitcast=True)  # +0, as PyTorch's zero buffer
    for k in range(K):
        z = direction_tile(first_counter, tl.load(row + _KEYS + k), ROWS, WIDTH, VEC)
        if FROZEN or MASKED:
            z = tl.where(keep, 0.0, z)
        if RESTORE:
            rc = tl.load(row + _KEYS + K + k).to(tl.int32).to(tl.float32, bitcast=True)
            x = tl.fma(z, rc, x)
        gc = tl.load(row + _KEYS + 2 * K + k).to(tl.int32).to(tl.float32, bitcast=True)
        d = tl.fma(z, gc, d)

    if RULE == 0:
        step = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    elif RULE == 1:
        if EVEN:
            m = tl.load(mp + off)
        else:
            m = tl.load(mp + off, mask=inb, other=0.0)
        m = m * beta1 + d
        if EVEN:
            tl.store(mp + off, m)
        else:
            tl.store(mp + off, m, mask=inb)
        step = m
    else:
        if EVEN:
            m = tl.load(mp + off)
            v = tl.load(vp + off)
        else:
            m = tl.load(mp + off, mask=inb, other=0.0)
            v = tl.load(vp + off, mask=inb, other=0.0)
        m = tl.fma(d, one_minus_beta1, m * beta1)
        v = tl.fma(one_minus_beta2 * d, d, v * beta2)  # as addcmul_ rounds
        if EVEN:
            tl.store(mp + off, m)
            tl.store(vp + off, v)
        else:
            tl.store(mp + off, m, mask=inb)
            tl.store(vp + off, v, mask=inb)
        bc1 = tl.load(row + _BC1).to(tl.int32).to(tl.float32, bitcast=True)
        bc2 = tl.load(row + _BC2).to(tl.int32).to(tl.float32, bitcast=True)
        denom = tl.sqrt_rn(tl.div_rn(v, bc2)) + adam_eps
        step = tl.div_rn(tl.div_rn(m, bc1), denom)
    if DECAY:
        x = x * scale
    x = tl.fma(step, neg_lr, x)

    if DTYPE == 0:
        new = x
    elif STOCHASTIC:
        words = round_words_tile(local0, tl.load(row + _RKEY), ROWS, WIDTH, VEC)
        new = round_to_half(x, words, DTYPE == 2, True).to(theta.dtype)
    elif HW_ROUND:  # cvt.rn, as in passes.py
        new = x.to(theta.dtype)
    else:
        new = round_to_half(x, x.to(tl.uint32, bitcast=True), DTYPE == 2, False).to(theta.dtype)
    if FROZEN or MASKED:
        new = tl.where(keep, theta, new)  # written back with their own bits
    if EVEN:
        tl.store(tp + off, new)
    else:
        tl.store(tp + off, new, mask=inb)


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _zo_rule_kernel(
    meta_ptr,
    meta_w,
    n_tensors,
    n_search,
    K,  # directions of the step (restore and gradient coefficients per direction)
    F,
    scale,  # 1 - lr * weight_decay
    neg_lr,
    beta1,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    adam_eps,
    BLOCK: tl.constexpr,
    WIDTH: tl.constexpr,
    VEC: tl.constexpr,
    DTYPE: tl.constexpr,
    RULE: tl.constexpr,  # 0 sign, 1 momentum, 2 adam
    DECAY: tl.constexpr,
    MASKED: tl.constexpr,
    FROZEN: tl.constexpr,
    RESTORE: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HW_ROUND: tl.constexpr,
    TAILS: tl.constexpr,
    TAIL_SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    t = find_tensor(meta_ptr, meta_w, n_tensors, n_search, pid, _FIRST)
    row = meta_ptr + t.to(tl.int64) * meta_w
    numel = tl.load(row + _NUMEL)
    local0 = (pid - tl.load(row + _FIRST)).to(tl.int64) * BLOCK
    theta_addr = tl.load(row + _THETA)
    if DTYPE == 0:
        theta_ptr = theta_addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        theta_ptr = theta_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        theta_ptr = theta_addr.to(tl.pointer_type(tl.float16))
    m_ptr = tl.load(row + _M).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(row + _V).to(tl.pointer_type(tl.float32))
    if TAILS:
        if local0 + BLOCK <= numel:
            _rule_tile(theta_ptr, m_ptr, v_ptr, row, local0, numel, K, F, scale, neg_lr, beta1, one_minus_beta1,
                       beta2, one_minus_beta2, adam_eps, BLOCK, WIDTH, VEC, DTYPE, RULE, DECAY, MASKED,
                       FROZEN, RESTORE, STOCHASTIC, ALIGNED, HW_ROUND, True)  # fmt: skip
        else:
            SUB: tl.constexpr = BLOCK // TAIL_SPLIT  # as in passes.py: registers
            for part in tl.range(0, TAIL_SPLIT, loop_unroll_factor=1):
                _rule_tile(theta_ptr, m_ptr, v_ptr, row, local0 + part * SUB, numel, K, F, scale, neg_lr, beta1,
                           one_minus_beta1, beta2, one_minus_beta2, adam_eps, SUB, WIDTH, VEC, DTYPE, RULE,
                           DECAY, MASKED, FROZEN, RESTORE, STOCHASTIC, ALIGNED, HW_ROUND, False)  # fmt: skip
    else:
        _rule_tile(theta_ptr, m_ptr, v_ptr, row, local0, numel, K, F, scale, neg_lr, beta1, one_minus_beta1,
                   beta2, one_minus_beta2, adam_eps, BLOCK, WIDTH, VEC, DTYPE, RULE, DECAY, MASKED,
                   FROZEN, RESTORE, STOCHASTIC, ALIGNED, HW_ROUND, True)  # fmt: skip


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
    for spec in specs:
        _check(spec.param, spec.name)
    for launch in _rule_launches(
        specs,
        rule=rule,
        restore=restore,
        grads=grads,
        lr=lr,
        weight_decay=weight_decay,
        states=states,
        steps=steps,
        momentum=momentum,
        betas=betas,
        adam_eps=adam_eps,
        distribution=distribution,
        round_seed=round_seed,
        magnitude_threshold=magnitude_threshold,
        block=block,
    ):
        with torch.no_grad():
            _launch(launch)


def _rule_launches(
    specs: Sequence[ParamSpec],
    *,
    rule: str,
    restore: Sequence[Term],
    grads: Sequence[Term],
    lr: float,
    weight_decay: float,
    states: Sequence[dict[str, torch.Tensor]],
    steps: Sequence[int] | None,
    momentum: float,
    betas: tuple[float, float],
    adam_eps: float,
    distribution: str,
    round_seed: int | None,
    magnitude_threshold,
    block: int | None,
) -> list[Launch]:
    """The launches of one rule update: one per (dtype, restore, masked, aligned) group; every
    argument is checked before the first launch, so a refusal writes nothing."""
    if rule not in RULE_CODES:
        raise ValueError(f"rule={rule!r} is not one of {tuple(RULE_CODES)}.")
    if len(states) != len(specs):
        raise ValueError(f"{len(states)} states for {len(specs)} tensors.")
    steps = list(steps) if steps is not None else [1] * len(specs)
    _group(distribution)
    need = {"sign": (), "momentum": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}[rule]
    seeds, r_coef, g_coef = merge_rule_terms(restore, grads)
    K = len(seeds)
    b1, b2 = betas
    thr = _thresholds(len(specs), magnitude_threshold)
    buckets: dict[tuple[torch.dtype, bool, bool, bool], list[int]] = {}
    for i, spec in enumerate(specs):
        for name in need:
            st = states[i].get(name)
            if (
                st is None
                or st.dtype != torch.float32
                or st.shape != spec.param.shape
                or not st.is_contiguous()
            ):
                raise ValueError(
                    f"{spec.name}: the {rule} rule needs a contiguous float32 state {name!r} of shape "
                    f"{tuple(spec.param.shape)}."
                )
        if spec.param.numel():
            aligned = _aligned(spec.param, 0) and all(_aligned(states[i][n], 0) for n in need)
            key = (spec.param.dtype, bool(r_coef) and spec.in_place, thr[i] is not None, aligned)
            buckets.setdefault(key, []).append(i)
    if not buckets:
        return []
    device = specs[0].param.device
    for s in specs:
        if s.param.device != device:
            raise ValueError(
                f"One launch needs all tensors on one device; got {device} and {s.param.device}."
            )
    first = momentum if rule == "momentum" else b1
    out = []
    for (dtype, with_restore, masked, aligned), idx in buckets.items():
        gspecs = [specs[i] for i in idx]
        frozen = [_frozen_ranges(s) for s in gspecs]
        F = max(len(f) for f in frozen)
        width = int(_KEYS) + 3 * K + 2 * F
        gblock = _block(distribution, dtype, max(s.param.numel() for s in gspecs), block)
        _, first_tile, n_tiles, tails = _tiling([(s.param.numel(), 0) for s in gspecs], gblock)
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
        meta[:, _FIRST] = first_tile
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
        out.append(
            Launch(
                kernel=_zo_rule_kernel,
                device=device,
                grid=n_tiles,
                table=meta,
                args=dict(
                    meta_w=width,
                    n_tensors=len(idx),
                    n_search=_search_steps(len(idx)),
                    K=K,
                    F=F,
                    scale=_f32(1.0 - lr * weight_decay),
                    neg_lr=_f32(-lr),
                    beta1=_f32(first),
                    one_minus_beta1=_f32(1.0 - b1),
                    beta2=_f32(b2),
                    one_minus_beta2=_f32(1.0 - b2),
                    adam_eps=_f32(adam_eps),
                ),
                constexprs=dict(
                    BLOCK=gblock,
                    WIDTH=tile_width(distribution, dtype),
                    VEC=VECTOR_BYTES // dtype.itemsize,
                    DTYPE=_DTYPE_CODE[dtype],
                    RULE=RULE_CODES[rule],
                    DECAY=weight_decay != 0.0,
                    MASKED=masked,
                    FROZEN=F > 0,
                    RESTORE=with_restore,
                    STOCHASTIC=stochastic,
                    ALIGNED=aligned,
                    HW_ROUND=not _interpreting(),
                    TAILS=tails,
                    TAIL_SPLIT=_tail_split(gblock, tile_width(distribution, dtype)),
                ),
            )
        )
    return out
