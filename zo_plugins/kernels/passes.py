"""Fused ZO passes in Triton: kernel, launcher, and the functions the core calls.

The functional entry points take the same keyword-only arguments as ``zo_plugins.core.passes``
(``perturb_``, ``perturbed_copy``, ``update_``) so the core can dispatch to either backend;
``chunk_size`` is accepted and ignored (z lives in registers, there are no chunk buffers).

One kernel serves every pass.  A program handles one tile of ``block`` consecutive elements of
one tensor: it reads theta once, regenerates every term's direction in registers from (seed,
tensor key, element index), forms ``x = (1 - decay) * theta + sum(coeff * z)`` in float32,
rounds (to nearest even, or stochastically for half-precision updates) and writes once.
Frozen rows and, for Sparse MeZO, elements with ``|theta| >= threshold`` are not written.

Many tensors share one launch: their addresses, sizes, keys and coefficients are packed into
one int64 table (a single host-to-device copy per launch), and a cached tile table maps each
program to (tensor, first element).  A model with hundreds of small tensors costs one launch
per dtype and pass, not one per tensor.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import triton
import triton.language as tl

from ..core.noise import GAUSSIAN_GROUP, RADEMACHER_GROUP, SR_SALT, philox_keys
from ..core.passes import ParamSpec, merge_terms
from .philox import direction_tile, round_to_half, round_words_tile

__all__ = [
    "DEFAULT_BLOCK",
    "SUPPORTED_DTYPES",
    "triton_perturb_",
    "triton_perturbed_copy",
    "triton_perturbed_copies",
    "triton_update_",
    "triton_update_foreach_",
    "triton_direction",
]

DEFAULT_BLOCK = 2048
"""Elements per program on CUDA (capped at the largest tensor of a launch, rounded up to a
power of two).  Part of no stream: any power of two >= 128 gives the same bits."""
_INTERPRETER_BLOCK = 1 << 15
"""Under TRITON_INTERPRET each program costs ~20 ms of Python on top of ~0.35 us per element,
so CPU tests use big tiles: 16K bf16 elements with stochastic rounding take 0.36 s at 2048
elements per program and 0.045 s at 16384."""
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
Term = tuple[int, float]

# Columns of the per-tensor int64 metadata table.
_SRC, _DST, _NUMEL, _BASE, _SCALE, _THRESH, _RKEY, _KEYS = range(8)


@triton.jit
def _zo_pass_kernel(
    tile_tensor_ptr,  # int32 [n_tiles]: which tensor each program works on
    tile_start_ptr,  # int64 [n_tiles]: the tile's first element, in the stream's indexing
    meta_ptr,  # int64 [T, meta_w]: per-tensor addresses, sizes, keys, coefficient bits
    meta_w,
    K: tl.constexpr,  # number of (seed, coeff) terms
    F: tl.constexpr,  # frozen element ranges per tensor
    ROWS: tl.constexpr,
    GROUP: tl.constexpr,  # elements per Philox call: 4 gaussian, 128 rademacher
    DTYPE: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
    DECAY: tl.constexpr,
    MASKED: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    IN_PLACE: tl.constexpr,
):
    pid = tl.program_id(0)
    t = tl.load(tile_tensor_ptr + pid).to(tl.int64)
    start = tl.load(tile_start_ptr + pid)
    row = meta_ptr + t * meta_w
    src_addr = tl.load(row + 0)
    dst_addr = tl.load(row + 1)
    numel = tl.load(row + 2)
    base = tl.load(row + 3)
    if DTYPE == 0:
        src = src_addr.to(tl.pointer_type(tl.float32))
        dst = dst_addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        src = src_addr.to(tl.pointer_type(tl.bfloat16))
        dst = dst_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        src = src_addr.to(tl.pointer_type(tl.float16))
        dst = dst_addr.to(tl.pointer_type(tl.float16))

    rows = tl.arange(0, ROWS).to(tl.int64)
    cols = tl.arange(0, GROUP).to(tl.int64)
    local = (start - base) + rows[:, None] * GROUP + cols[None, :]
    inb = (local >= 0) & (local < numel)
    theta = tl.load(src + local, mask=inb, other=0.0)
    x = theta.to(tl.float32)
    if DECAY:
        x = x * tl.load(row + 4).to(tl.int32).to(tl.float32, bitcast=True)
    if K > 0:
        first_counter = start // GROUP
        for k in tl.static_range(K):
            key = tl.load(row + 7 + k)
            coeff = tl.load(row + 7 + K + k).to(tl.int32).to(tl.float32, bitcast=True)
            cz = coeff * direction_tile(first_counter, key, ROWS, GROUP)
            if k == 0:
                acc = cz
            else:
                acc = acc + cz
        x = x + acc

    active = inb
    for f in tl.static_range(F):
        lo = tl.load(row + 7 + 2 * K + 2 * f)
        hi = tl.load(row + 8 + 2 * K + 2 * f)
        active = active & ((local < lo) | (local >= hi))
    if MASKED:
        thresh = tl.load(row + 5).to(tl.int32).to(tl.float32, bitcast=True)
        active = active & (tl.abs(theta.to(tl.float32)) < thresh)

    if DTYPE == 0:
        new = x
    else:
        if STOCHASTIC:
            words = round_words_tile(start, tl.load(row + 6), ROWS, GROUP)
        else:
            words = x.to(tl.uint32, bitcast=True)  # unused
        new = round_to_half(x, words, DTYPE == 2, STOCHASTIC).to(theta.dtype)
    if IN_PLACE:
        tl.store(dst + local, new, mask=active)
    else:
        tl.store(dst + local, tl.where(active, new, theta), mask=inb)


# --------------------------------------------------------------------------- launcher


@dataclass
class _Job:
    """One tensor of a launch: read ``src``, write ``dst`` (the same tensor when in place)."""

    src: torch.Tensor
    dst: torch.Tensor
    key: int
    frozen: list[tuple[int, int]] = field(default_factory=list)
    threshold: float | None = None
    base: int = 0


_TILES: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()


def _tile_tables(device: torch.device, block: int, extents: tuple[tuple[int, int], ...]):
    """(tile -> tensor index, tile -> first element) for tensors of (numel, base); cached,
    since a training run launches the same shapes every step."""
    ck = (device, block, extents)
    hit = _TILES.get(ck)
    if hit is not None:
        _TILES.move_to_end(ck)
        return hit
    idx, starts = [], []
    for t, (numel, base) in enumerate(extents):
        first = (base // block) * block
        count = -(-(base + numel - first) // block)
        idx.append(np.full(count, t, dtype=np.int32))
        starts.append(first + block * np.arange(count, dtype=np.int64))
    tables = (
        torch.from_numpy(np.concatenate(idx)).to(device),
        torch.from_numpy(np.concatenate(starts)).to(device),
    )
    _TILES[ck] = tables
    if len(_TILES) > 64:
        _TILES.popitem(last=False)
    return tables


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _check(t: torch.Tensor, name: str) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"The Triton passes handle float32, bfloat16 and float16 tensors; {name} is {t.dtype}. "
            "Use backend='torch' for it."
        )
    if not t.is_contiguous():
        raise ValueError(
            f"ZO passes need contiguous parameters; {name} is a non-contiguous view "
            f"(shape {tuple(t.shape)}, stride {t.stride()}): call .data = .data.contiguous() on it first."
        )
    if t.device.type != "cuda" and not (t.device.type == "cpu" and _interpreting()):
        raise ValueError(
            f"The Triton passes run on CUDA tensors; {name} is on {t.device}. Use backend='torch' "
            "(or TRITON_INTERPRET=1 with CPU tensors, for tests: ~0.35 us per element)."
        )


def _frozen_ranges(spec: ParamSpec) -> list[tuple[int, int]]:
    row = spec.row_len
    return [(r * row, (r + 1) * row) for r in spec.frozen_rows]


def _thresholds(n: int, magnitude_threshold) -> list[float | None]:
    if magnitude_threshold is None or isinstance(magnitude_threshold, (int, float)):
        return [magnitude_threshold] * n
    out = list(magnitude_threshold)
    if len(out) != n:
        raise ValueError(f"magnitude_threshold has {len(out)} values for {n} tensors.")
    return out


def _auto_block(group: int, largest: int) -> int:
    cap = _INTERPRETER_BLOCK if _interpreting() else DEFAULT_BLOCK
    return max(group, min(cap, 1 << max(largest - 1, 1).bit_length()))


def _group(distribution: str) -> int:
    if distribution == "rademacher":
        return RADEMACHER_GROUP
    if distribution in ("gaussian", "gaussian-philox"):  # the kernels' Gaussian is the Philox stream
        return GAUSSIAN_GROUP
    raise ValueError(f"distribution={distribution!r} is not one of ('gaussian', 'rademacher').")


def _f32_bits(v: float) -> int:
    return int(np.float32(v).view(np.int32))


def _run(
    jobs: Sequence[_Job],
    terms: Sequence[Term],
    *,
    distribution: str,
    decay: float = 0.0,
    round_seed: int | None = None,
    in_place: bool,
    block: int | None = None,
) -> None:
    """Launch the fused pass over ``jobs``: one launch per (dtype, masked) group."""
    group = _group(distribution)
    if block is not None and (block < group or block & (block - 1)):
        raise ValueError(f"block={block} must be a power of two >= {group} for {distribution} directions.")
    jobs = [j for j in jobs if j.src.numel()]
    if not jobs:
        return
    device = jobs[0].src.device
    for j in jobs:
        if j.src.device != device or j.dst.device != device:
            raise ValueError(f"One launch needs all tensors on one device; got {device} and {j.src.device}.")
    groups: dict[tuple[torch.dtype, bool], list[_Job]] = {}
    for j in jobs:
        groups.setdefault((j.src.dtype, j.threshold is not None), []).append(j)
    seeds = [s for s, _ in terms]
    coeff_bits = [_f32_bits(c) for _, c in terms]
    K = len(terms)
    for (dtype, masked), gjobs in groups.items():
        T = len(gjobs)
        gblock = block or _auto_block(group, max(j.src.numel() for j in gjobs))
        F = max(len(j.frozen) for j in gjobs)
        width = 7 + 2 * K + 2 * F
        meta = np.zeros((T, width), dtype=np.int64)
        meta[:, _SRC] = [j.src.data_ptr() for j in gjobs]
        meta[:, _DST] = [j.dst.data_ptr() for j in gjobs]
        meta[:, _NUMEL] = [j.src.numel() for j in gjobs]
        meta[:, _BASE] = [j.base for j in gjobs]
        meta[:, _SCALE] = _f32_bits(1.0 - decay)
        meta[:, _THRESH] = [_f32_bits(j.threshold if masked else np.inf) for j in gjobs]
        tkeys = [j.key for j in gjobs]
        stochastic = round_seed is not None and dtype != torch.float32
        if stochastic:
            meta[:, _RKEY] = philox_keys(round_seed, tkeys, salt=SR_SALT)
        for k, seed in enumerate(seeds):
            meta[:, _KEYS + k] = philox_keys(seed, tkeys)
            meta[:, _KEYS + K + k] = coeff_bits[k]
        for t, j in enumerate(gjobs):
            for f, (lo, hi) in enumerate(j.frozen):
                meta[t, _KEYS + 2 * K + 2 * f : _KEYS + 2 * K + 2 * f + 2] = (lo, hi)
        meta_t = torch.from_numpy(meta).to(device, non_blocking=True)
        tile_tensor, tile_start = _tile_tables(device, gblock, tuple((j.src.numel(), j.base) for j in gjobs))
        _zo_pass_kernel[(tile_tensor.numel(),)](
            tile_tensor,
            tile_start,
            meta_t,
            width,
            K=K,
            F=F,
            ROWS=gblock // group,
            GROUP=group,
            DTYPE=_DTYPE_CODE[dtype],
            DECAY=decay != 0.0,
            MASKED=masked,
            STOCHASTIC=stochastic,
            IN_PLACE=in_place,
            num_warps=4,
            # No FMA contraction: x*(1-decay) + c*z rounds like the PyTorch passes.
            enable_fp_fusion=False,
        )


# --------------------------------------------------------------------------- entry points


def _spec_job(spec: ParamSpec, dst: torch.Tensor | None, threshold: float | None) -> _Job:
    _check(spec.param, spec.name)
    src = spec.param.detach()
    return _Job(src, src if dst is None else dst, spec.key, _frozen_ranges(spec), threshold)


def triton_perturb_(
    specs: Sequence[ParamSpec],
    terms: Sequence[Term],
    *,
    distribution: str,
    chunk_size: int | None = None,
    magnitude_threshold: float | Sequence[float | None] | None = None,
    block: int | None = None,
) -> None:
    """In place: ``theta += sum(coeff * z(seed))`` for every tensor of ``specs``, one launch
    per dtype.  Same arguments as ``core.passes.perturb_``; ``magnitude_threshold`` (one value
    or one per spec) restricts the pass to ``|theta| < threshold`` (Sparse MeZO)."""
    del chunk_size  # z is generated in registers: no chunk buffers
    thr = _thresholds(len(specs), magnitude_threshold)
    jobs = [_spec_job(s, None, th) for s, th in zip(specs, thr)]
    with torch.no_grad():
        _run(jobs, list(terms), distribution=distribution, in_place=True, block=block)


def triton_perturbed_copies(
    specs: Sequence[ParamSpec],
    terms: Sequence[Term],
    *,
    distribution: str,
    chunk_size: int | None = None,
    magnitude_threshold: float | Sequence[float | None] | None = None,
    block: int | None = None,
) -> list[torch.Tensor]:
    """Out of place, one launch for all ``specs``: new tensors ``theta + sum(coeff * z)`` in
    each theta's dtype (rounded to nearest even); theta is not touched."""
    del chunk_size
    thr = _thresholds(len(specs), magnitude_threshold)
    outs, jobs = [], []
    for s, th in zip(specs, thr):
        out = torch.empty_like(s.param, memory_format=torch.contiguous_format).detach()
        outs.append(out)
        jobs.append(_spec_job(s, out, th))
    with torch.no_grad():
        _run(jobs, list(terms), distribution=distribution, in_place=False, block=block)
    return outs


def triton_perturbed_copy(
    spec: ParamSpec,
    terms: Sequence[Term],
    *,
    distribution: str,
    chunk_size: int | None = None,
    chunks: object | None = None,
    magnitude_threshold: float | None = None,
    block: int | None = None,
) -> torch.Tensor:
    """``core.passes.perturbed_copy`` on the Triton path (``chunks`` is accepted and ignored)."""
    del chunks
    return triton_perturbed_copies(
        [spec],
        terms,
        distribution=distribution,
        chunk_size=chunk_size,
        magnitude_threshold=magnitude_threshold,
        block=block,
    )[0]


def triton_update_(
    spec: ParamSpec,
    *,
    restore: Sequence[Term],
    update: Sequence[Term],
    decay: float,
    distribution: str,
    chunk_size: int | None = None,
    round_seed: int | None = None,
    magnitude_threshold: float | None = None,
    block: int | None = None,
) -> None:
    """``core.passes.update_`` on the Triton path: one read-modify-write
    ``theta = (1 - decay) * (theta + sum(restore)) + sum(update)``, frozen rows untouched,
    stochastic rounding for bf16/fp16 when ``round_seed`` is given."""
    triton_update_foreach_(
        [spec],
        restore=restore,
        update=update,
        decay=decay,
        distribution=distribution,
        chunk_size=chunk_size,
        round_seed=round_seed,
        magnitude_threshold=magnitude_threshold,
        block=block,
        restore_out_of_place=True,
    )


def triton_update_foreach_(
    specs: Sequence[ParamSpec],
    *,
    restore: Sequence[Term],
    update: Sequence[Term],
    decay: float,
    distribution: str,
    chunk_size: int | None = None,
    round_seed: int | None = None,
    magnitude_threshold: float | Sequence[float | None] | None = None,
    block: int | None = None,
    restore_out_of_place: bool = False,
) -> None:
    """The update of a whole param group in one launch per dtype.  ``restore`` applies to the
    specs perturbed in place (``spec.in_place``), as ``ZOOptimizer.apply_update`` does; with
    ``restore_out_of_place=True`` it applies to every spec."""
    del chunk_size
    thr = _thresholds(len(specs), magnitude_threshold)
    with_restore = merge_terms(restore, update, restore_scale=1.0 - decay)
    without = merge_terms([], update)
    buckets: dict[bool, list[_Job]] = {True: [], False: []}
    for s, th in zip(specs, thr):
        buckets[bool(restore) and (s.in_place or restore_out_of_place)].append(_spec_job(s, None, th))
    with torch.no_grad():
        for has_restore, jobs in buckets.items():
            terms = with_restore if has_restore else without
            if jobs and (terms or decay):
                _run(
                    jobs,
                    terms,
                    distribution=distribution,
                    decay=decay,
                    round_seed=round_seed,
                    in_place=True,
                    block=block,
                )


def triton_direction(
    numel: int,
    *,
    distribution: str,
    seed: int,
    key: int,
    offset: int = 0,
    device: torch.device | str = "cuda",
    block: int | None = None,
) -> torch.Tensor:
    """Materialise the float32 direction elements ``[offset, offset + numel)`` (for tests and
    analysis; the passes never do this).  ``offset`` lets a shard generate its own slice."""
    out = torch.zeros(numel, dtype=torch.float32, device=device)
    _check(out, "the direction buffer")
    _run(
        [_Job(out, out, key, base=offset)],
        [(seed, 1.0)],
        distribution=distribution,
        in_place=True,
        block=block,
    )
    return out
