"""Fused ZO passes in Triton: kernel, launcher, and the functions the core calls.

The functional entry points take the same keyword-only arguments as ``zo_plugins.core.passes``
(``perturb_``, ``perturbed_copy``, ``update_``) so the core can dispatch to either backend;
``chunk_size`` is accepted and ignored (z lives in registers, there are no chunk buffers).

One kernel serves every pass.  A program handles one tile of ``block`` consecutive elements of
one tensor: it reads theta once, regenerates every term's direction in registers from (seed,
tensor key, element index), forms ``x = (1 - decay) * theta + sum(coeff * z)`` in float32,
rounds (to nearest even, or stochastically for half-precision updates) and writes once.
Frozen rows and, for Sparse MeZO, elements with ``|theta| >= threshold`` are written back with
the bits they had.

Many tensors share one launch: their addresses, sizes, keys and coefficients are packed into
one int64 table, copied from pinned memory without blocking the host, and each program finds
its tensor by bisecting the tensors' first programs.  A model with hundreds of small tensors
costs one launch per dtype and pass, not one per tensor, and no launch waits for the GPU.

Full tiles of 16-byte-aligned tensors take an unmasked path with vector loads and stores (the
host checks the alignment; ``tl.multiple_of`` tells the compiler); a tensor's partial first or
last tile takes a masked path.  The term and frozen-range loops are runtime loops, so the
register count does not grow with the number of terms.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import triton
import triton.language as tl

from ..core.noise import GAUSSIAN_GROUP, RADEMACHER_GROUP, SR_SALT, philox_keys
from ..core.passes import ParamSpec, merge_terms
from .philox import (
    direction_tile,
    find_tensor,
    in_bounds,
    in_ranges,
    rademacher_signs,
    round_to_half,
    round_words_tile,
    tile_offsets,
    zero_bits,
)

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

DEFAULT_BLOCK = 4096
"""Largest number of elements per program on CUDA (``cuda_block`` picks per distribution and
dtype).  Part of no stream: any power of two >= the tile width gives the same bits."""
NUM_WARPS = 4
_INTERPRETER_BLOCK = 1 << 15
"""Under TRITON_INTERPRET each program costs ~20 ms of Python on top of ~0.35 us per element,
so CPU tests use big tiles: 16K bf16 elements with stochastic rounding take 0.36 s at 2048
elements per program and 0.045 s at 16384."""
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
TAIL_SPLIT = 4
"""A partial tile runs as this many sub-tiles on CUDA (``_tail_split``)."""
VECTOR_BYTES = 16
"""Width of the vector loads and stores of the aligned full-tile path (ld/st.global.v4)."""
Term = tuple[int, float]

# Columns of the per-tensor int64 table of a pass launch.
_SRC: tl.constexpr = tl.constexpr(0)  # address read
_DST: tl.constexpr = tl.constexpr(1)  # address written (the same when in place)
_NUMEL: tl.constexpr = tl.constexpr(2)
_BASE: tl.constexpr = tl.constexpr(3)  # stream index of the tensor's element 0 (a shard's offset)
_TILE0: tl.constexpr = tl.constexpr(4)  # stream index of the tensor's first tile
_FIRST: tl.constexpr = tl.constexpr(5)  # the tensor's first program
_THRESH: tl.constexpr = tl.constexpr(6)  # float32 bits of the magnitude threshold
_RKEY: tl.constexpr = tl.constexpr(7)  # Philox key of the stochastic-rounding words
_KEYS: tl.constexpr = tl.constexpr(8)  # K Philox keys, K coefficient bits, 2F frozen bounds


@triton.jit
def _pass_tile(
    src,
    dst,
    row,
    local0,
    numel,
    start,
    K,
    F,
    scale,
    BLOCK: tl.constexpr,
    WIDTH: tl.constexpr,
    VEC: tl.constexpr,
    DTYPE: tl.constexpr,
    TERMS: tl.constexpr,
    DECAY: tl.constexpr,
    MASKED: tl.constexpr,
    FROZEN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HW_ROUND: tl.constexpr,
    EVEN: tl.constexpr,
):
    """One tile: elements ``[local0, local0 + BLOCK)`` of the tensor (``start`` in the stream).
    ``EVEN``: the whole tile is inside the tensor (no masks)."""
    ROWS: tl.constexpr = BLOCK // WIDTH
    off = tile_offsets(ROWS, WIDTH, VEC)
    s = src + local0
    d = dst + local0
    if EVEN:
        if ALIGNED:  # the host checked: both addresses are 16-byte aligned here
            s = tl.multiple_of(s, 16)
            d = tl.multiple_of(d, 16)
        theta = tl.load(s + off)
    else:
        inb = in_bounds(off, local0, numel, BLOCK)
        theta = tl.load(s + off, mask=inb, other=0.0)
    if TERMS:
        # -0.0 + y == y for every y (also y = -0.0): the sum rounds as if it began at term 0.
        # theta is widened after the loop, so only the sum is live across it.
        acc = (zero_bits(theta.to(tl.float32)) | 0x80000000).to(tl.float32, bitcast=True)
        for k in range(K):
            key = tl.load(row + _KEYS + k)
            coeff_bits = tl.load(row + _KEYS + K + k).to(tl.uint32)
            if WIDTH == 128:
                # coeff * (+-1) is coeff with its sign flipped where z = -1: exact, one logical op
                sign = rademacher_signs(start // 128, key, ROWS, VEC)
                acc = acc + (coeff_bits ^ sign).to(tl.float32, bitcast=True)
            else:
                coeff = coeff_bits.to(tl.float32, bitcast=True)
                acc = acc + coeff * direction_tile(start // 4, key, ROWS, WIDTH, VEC)
    x = theta.to(tl.float32)
    if DECAY:
        x = x * scale
    if TERMS:
        x = x + acc
    if DTYPE == 0:
        new = x
    elif STOCHASTIC:
        words = round_words_tile(start, tl.load(row + _RKEY), ROWS, WIDTH, VEC)
        new = round_to_half(x, words, DTYPE == 2, True).to(theta.dtype)
    elif HW_ROUND:
        # cvt.rn: IEEE round to nearest even, the rounding core.rounding defines (scripts/gpu_check.py
        # compares them on the GPU); the interpreter truncates here, so it takes the bit arithmetic
        new = x.to(theta.dtype)
    else:
        new = round_to_half(x, x.to(tl.uint32, bitcast=True), DTYPE == 2, False).to(theta.dtype)
    if FROZEN:
        keep = in_ranges(off, x, local0, row + _KEYS + 2 * K, F, BLOCK)
        if MASKED:
            thresh = tl.load(row + _THRESH).to(tl.int32).to(tl.float32, bitcast=True)
            keep = keep | ~(tl.abs(theta.to(tl.float32)) < thresh)
        new = tl.where(keep, theta, new)
    elif MASKED:
        thresh = tl.load(row + _THRESH).to(tl.int32).to(tl.float32, bitcast=True)
        new = tl.where(tl.abs(theta.to(tl.float32)) < thresh, new, theta)
    # kept elements are written back with their own bits: one unmasked vector store per
    # 16 bytes instead of per-element masks
    if EVEN:
        tl.store(d + off, new)
    else:
        tl.store(d + off, new, mask=inb)


# Runtime integers are not specialised (Triton would compile a variant for the value 1 and for
# multiples of 16) except K == 1: the launcher's constexprs and whether K is 1 decide which
# variant runs, so the compile tier (compile_report.py) covers what a launch can pick.  K == 1
# (a +-eps perturbation, a merged restore + update) unrolls the term loop; K >= 2 runs it as a
# loop, so registers do not grow with the number of terms.
_RUNTIME_INTS = ["meta_w", "n_tensors", "n_search", "F"]


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _zo_pass_kernel(
    meta_ptr,  # int64 [n_tensors, meta_w]: per-tensor addresses, sizes, keys, coefficient bits
    meta_w,
    n_tensors,
    n_search,  # bisection steps: ceil(log2(n_tensors))
    K,  # number of (seed, coeff) terms
    F,  # frozen element ranges per tensor
    scale,  # 1 - decay (float32)
    BLOCK: tl.constexpr,  # elements per program
    WIDTH: tl.constexpr,  # elements per tile row: 128 rademacher, 4 or 8 gaussian
    VEC: tl.constexpr,  # elements per 16 bytes
    DTYPE: tl.constexpr,  # 0 float32, 1 bfloat16, 2 float16
    TERMS: tl.constexpr,
    DECAY: tl.constexpr,
    MASKED: tl.constexpr,
    FROZEN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    ALIGNED: tl.constexpr,
    HW_ROUND: tl.constexpr,  # round to nearest with cvt.rn (compiled) or bit arithmetic (interpreter)
    TAILS: tl.constexpr,  # some tensor has a partial tile
    TAIL_SPLIT: tl.constexpr,  # sub-tiles of a partial tile
):
    pid = tl.program_id(0)
    t = find_tensor(meta_ptr, meta_w, n_tensors, n_search, pid, _FIRST)
    row = meta_ptr + t.to(tl.int64) * meta_w
    numel = tl.load(row + _NUMEL)
    start = tl.load(row + _TILE0) + (pid - tl.load(row + _FIRST)).to(tl.int64) * BLOCK
    local0 = start - tl.load(row + _BASE)
    src_addr = tl.load(row + _SRC)
    dst_addr = tl.load(row + _DST)
    if DTYPE == 0:
        src = src_addr.to(tl.pointer_type(tl.float32))
        dst = dst_addr.to(tl.pointer_type(tl.float32))
    elif DTYPE == 1:
        src = src_addr.to(tl.pointer_type(tl.bfloat16))
        dst = dst_addr.to(tl.pointer_type(tl.bfloat16))
    else:
        src = src_addr.to(tl.pointer_type(tl.float16))
        dst = dst_addr.to(tl.pointer_type(tl.float16))
    if TAILS:
        if (local0 >= 0) & (local0 + BLOCK <= numel):
            _pass_tile(src, dst, row, local0, numel, start, K, F, scale, BLOCK, WIDTH, VEC, DTYPE, TERMS,
                       DECAY, MASKED, FROZEN, STOCHASTIC, ALIGNED, HW_ROUND, True)  # fmt: skip
        else:
            # a partial tile, in TAIL_SPLIT sub-tiles: its masked accesses are scalar and its
            # layout spreads rows over threads, so a whole tile would set the register count
            # of the full tiles' path too (compile_report: 254 instead of ~100 registers)
            SUB: tl.constexpr = BLOCK // TAIL_SPLIT
            for part in tl.range(0, TAIL_SPLIT, loop_unroll_factor=1):
                o = part * SUB
                _pass_tile(src, dst, row, local0 + o, numel, start + o, K, F, scale, SUB, WIDTH, VEC, DTYPE,
                           TERMS, DECAY, MASKED, FROZEN, STOCHASTIC, ALIGNED, HW_ROUND, False)  # fmt: skip
    else:
        _pass_tile(src, dst, row, local0, numel, start, K, F, scale, BLOCK, WIDTH, VEC, DTYPE, TERMS,
                   DECAY, MASKED, FROZEN, STOCHASTIC, ALIGNED, HW_ROUND, True)  # fmt: skip


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


@dataclass
class Launch:
    """One kernel launch, fully decided on the host: the kernel, its grid, the per-tensor int64
    table and every other argument.  ``_launch`` runs it; ``compile_report`` compiles exactly
    these arguments for a GPU target without one."""

    kernel: Any
    device: torch.device
    grid: int
    table: np.ndarray
    args: dict[str, int | float]
    constexprs: dict[str, int | bool]

    @property
    def options(self) -> dict[str, Any]:
        # No FMA contraction: x*(1-decay) + c*z rounds like the PyTorch passes.
        return dict(num_warps=NUM_WARPS, enable_fp_fusion=False)


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


def _group(distribution: str) -> int:
    if distribution == "rademacher":
        return RADEMACHER_GROUP
    if distribution in ("gaussian", "gaussian-philox"):  # the kernels' Gaussian is the Philox stream
        return GAUSSIAN_GROUP
    raise ValueError(f"distribution={distribution!r} is not one of ('gaussian', 'rademacher').")


def tile_width(distribution: str, dtype: torch.dtype) -> int:
    """Elements per tile row: 128 Rademacher signs (one Philox call), or 4 normals (float32) /
    8 normals (bf16/fp16: two calls) so that a row is one 16-byte vector."""
    if _group(distribution) == RADEMACHER_GROUP:
        return RADEMACHER_GROUP
    return VECTOR_BYTES // dtype.itemsize


def cuda_block(distribution: str, dtype: torch.dtype) -> int:
    """Elements per program on CUDA (4 warps).  Rademacher: 2048 (float32) / 4096 (bf16/fp16),
    i.e. each thread owns one 16-byte vector of each word of one row's Philox call.  Gaussian:
    1024 / 2048, 8 or 16 normals per thread -- the pass is bound by Box-Muller's arithmetic,
    and doubling the block cut the issue cycles per element by 7-13% but raised the registers
    from 51/70 to 80/124 (sm_90, compile_report), halving the warps that hide its latency."""
    half = dtype != torch.float32
    if _group(distribution) == RADEMACHER_GROUP:
        return DEFAULT_BLOCK if half else DEFAULT_BLOCK // 2
    return DEFAULT_BLOCK // 2 if half else DEFAULT_BLOCK // 4


def _block(distribution: str, dtype: torch.dtype, largest: int, block: int | None) -> int:
    width = tile_width(distribution, dtype)
    if block is not None:
        if block < width or block & (block - 1):
            raise ValueError(
                f"block={block} must be a power of two >= {width} for {distribution} {dtype} directions."
            )
        return block
    if _interpreting():  # each program costs ~20 ms of Python: the biggest tile that is not wasted
        return max(width, min(_INTERPRETER_BLOCK, 1 << max(largest - 1, 1).bit_length()))
    return cuda_block(distribution, dtype)


def _tail_split(block: int, width: int) -> int:
    """Sub-tiles a partial tile is processed in: 4 when compiled (registers, see the kernel), 1
    under the interpreter (each sub-tile costs ~20 ms of Python), never below one tile row."""
    return max(1, min(TAIL_SPLIT if not _interpreting() else 1, block // width))


def _f32_bits(v: float) -> int:
    return int(np.float32(v).view(np.int32))


def _aligned(t: torch.Tensor, base: int) -> bool:
    """Whether ``t``'s element ``local0 = start - base`` is 16-byte aligned for every tile start
    (a multiple of the block): the condition of the vector path."""
    return (t.data_ptr() - base * t.element_size()) % VECTOR_BYTES == 0


def _tiling(extents: Sequence[tuple[int, int]], block: int) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """For tensors of ``(numel, base)``: each one's first tile (stream index), first program,
    the total number of programs, and whether any tile is partial."""
    numel = np.array([n for n, _ in extents], dtype=np.int64)
    base = np.array([b for _, b in extents], dtype=np.int64)
    tile0 = (base // block) * block
    count = -(-(base + numel - tile0) // block)
    first = np.concatenate([[0], np.cumsum(count)[:-1]]).astype(np.int64)
    tails = bool(((tile0 != base) | ((base + numel) % block != 0)).any())
    return tile0, first, int(count.sum()), tails


def _search_steps(n: int) -> int:
    return max(0, math.ceil(math.log2(n))) if n > 1 else 0


def _device_guard(device: torch.device):
    """Launch under the tensors' device, not the current one: Triton takes the device (and the
    stream) of a launch from ``torch.cuda.current_device()``."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def _device_table(table: np.ndarray, device: torch.device) -> torch.Tensor:
    """The launch table on ``device`` without blocking the host: pageable memory would make
    ``copy_`` wait for the stream (a sync per launch), pinned memory from PyTorch's caching host
    allocator does not, and that allocator keeps the block until the copy has completed."""
    host = torch.from_numpy(np.ascontiguousarray(table))
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _launch(launch: Launch) -> None:
    with _device_guard(launch.device):
        meta = _device_table(launch.table, launch.device)
        launch.kernel[(launch.grid,)](meta, **launch.args, **launch.constexprs, **launch.options)


def _pass_launches(
    jobs: Sequence[_Job],
    terms: Sequence[Term],
    *,
    distribution: str,
    decay: float = 0.0,
    round_seed: int | None = None,
    block: int | None = None,
) -> list[Launch]:
    """The launches of one pass over ``jobs``: one per (dtype, masked, aligned) group."""
    _group(distribution)
    jobs = [j for j in jobs if j.src.numel()]
    if not jobs:
        return []
    device = jobs[0].src.device
    for j in jobs:
        if j.src.device != device or j.dst.device != device:
            raise ValueError(f"One launch needs all tensors on one device; got {device} and {j.src.device}.")
    groups: dict[tuple[torch.dtype, bool, bool], list[_Job]] = {}
    for j in jobs:
        aligned = _aligned(j.src, j.base) and _aligned(j.dst, j.base)
        groups.setdefault((j.src.dtype, j.threshold is not None, aligned), []).append(j)
    seeds = [s for s, _ in terms]
    coeff_bits = [_f32_bits(c) for _, c in terms]
    K = len(terms)
    out = []
    for (dtype, masked, aligned), gjobs in groups.items():
        T = len(gjobs)
        gblock = _block(distribution, dtype, max(j.src.numel() for j in gjobs), block)
        F = max(len(j.frozen) for j in gjobs)
        width = int(_KEYS) + 2 * K + 2 * F
        tile0, first, n_tiles, tails = _tiling([(j.src.numel(), j.base) for j in gjobs], gblock)
        meta = np.zeros((T, width), dtype=np.int64)
        meta[:, _SRC] = [j.src.data_ptr() for j in gjobs]
        meta[:, _DST] = [j.dst.data_ptr() for j in gjobs]
        meta[:, _NUMEL] = [j.src.numel() for j in gjobs]
        meta[:, _BASE] = [j.base for j in gjobs]
        meta[:, _TILE0] = tile0
        meta[:, _FIRST] = first
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
        out.append(
            Launch(
                kernel=_zo_pass_kernel,
                device=device,
                grid=n_tiles,
                table=meta,
                args=dict(
                    meta_w=width,
                    n_tensors=T,
                    n_search=_search_steps(T),
                    K=K,
                    F=F,
                    scale=float(np.float32(1.0 - decay)),
                ),
                constexprs=dict(
                    BLOCK=gblock,
                    WIDTH=tile_width(distribution, dtype),
                    VEC=VECTOR_BYTES // dtype.itemsize,
                    DTYPE=_DTYPE_CODE[dtype],
                    TERMS=K > 0,
                    DECAY=decay != 0.0,
                    MASKED=masked,
                    FROZEN=F > 0,
                    STOCHASTIC=stochastic,
                    ALIGNED=aligned,
                    HW_ROUND=not _interpreting(),
                    TAILS=tails,
                    TAIL_SPLIT=_tail_split(gblock, tile_width(distribution, dtype)),
                ),
            )
        )
    return out


def _run(
    jobs: Sequence[_Job],
    terms: Sequence[Term],
    *,
    distribution: str,
    decay: float = 0.0,
    round_seed: int | None = None,
    block: int | None = None,
) -> None:
    """Launch the fused pass over ``jobs`` (in place where a job's ``dst`` is its ``src``)."""
    for launch in _pass_launches(
        jobs, terms, distribution=distribution, decay=decay, round_seed=round_seed, block=block
    ):
        _launch(launch)


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
        _run(jobs, list(terms), distribution=distribution, block=block)


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
        _run(jobs, list(terms), distribution=distribution, block=block)
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
        block=block,
    )
    return out
