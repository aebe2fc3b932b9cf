"""Triton device functions: Philox-4x32-10, the direction tiles, stochastic-rounding words and
exact round-to-nearest-even / stochastic rounding of float32 to bf16/fp16.

A tile is ``ROWS`` rows of ``WIDTH`` consecutive elements, starting at an element that is a
multiple of the block.  Its shape is chosen so that, once Triton spreads it over threads with
16-byte vectors along the last axis, every thread owns whole Philox outputs:

* Rademacher (``WIDTH`` = 128: one Philox call gives a row's 128 signs): the tile is
  ``[4, ROWS, 32 // VEC, VEC]`` -- (word, row, vector, element) with ``VEC`` elements per 16
  bytes, element ``row*128 + word*32 + vector*VEC + element``.  Threads spread over rows and
  vectors only, so a thread holds the same vector of all four words of its row and computes
  one Philox call for 4 x 8 (bf16/fp16) or 4 x 4 (fp32) elements; a warp's vector loads
  still cover whole 32-byte sectors.  (The earlier ``[ROWS, 128]`` tile put one column per
  thread and cost one Philox call per element.)
* Gaussian (``GROUP`` = 4 normals per call): ``[ROWS, WIDTH]`` with ``WIDTH`` 4 (fp32) or 8
  (bf16/fp16, two calls per row), so a row is one 16-byte vector.

Stream definitions: ``core/noise.py``.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox-4x32 with 10 rounds on uint32 tensors (Salmon et al., SC'11)."""
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(c0, 0xD2511F53)
        lo0 = c0 * 0xD2511F53
        hi2 = tl.umulhi(c2, 0xCD9E8D57)
        lo2 = c2 * 0xCD9E8D57
        c0 = hi2 ^ c1 ^ k0
        c1 = lo2
        c2 = hi0 ^ c3 ^ k1
        c3 = lo0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return c0, c1, c2, c3


@triton.jit
def philox_counter(counter, key):
    """Philox words for int64 ``counter`` (c0 = low 32 bits, c1 = high 32, c2 = c3 = 0) under
    the int64 bit pattern of a 64-bit ``key`` (k0 = low 32 bits, k1 = high 32)."""
    c0 = (counter & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((counter >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    k0 = (key & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return philox4x32_10(c0, c1, zero, zero, k0, k1)


@triton.jit
def _box_muller(wa, wb):
    u1 = ((wa >> 8).to(tl.float32) + 1.0) * 5.9604644775390625e-08  # (0, 1]
    u2 = (wb >> 8).to(tl.float32) * 5.9604644775390625e-08  # [0, 1)
    rad = tl.sqrt_rn(-2.0 * tl.log(u1))
    ang = u2 * 6.2831854820251465  # float32(2 pi)
    return rad * tl.cos(ang), rad * tl.sin(ang)


@triton.jit
def find_tensor(meta_ptr, meta_w, n_tensors, n_search, pid, FIRST: tl.constexpr):
    """Row of the launch table whose tensor owns program ``pid``: the last ``t`` with
    ``meta[t, FIRST] <= pid`` (the tensors' first programs, increasing), by ``n_search`` >=
    ceil(log2(n_tensors)) bisection steps -- a few cached scalar loads per program instead of
    a per-program table uploaded with every launch."""
    t = pid * 0
    hi = t + n_tensors
    for _ in range(n_search):
        mid = (t + hi) // 2
        go = tl.load(meta_ptr + mid.to(tl.int64) * meta_w + FIRST) <= pid
        t = tl.where(go, mid, t)
        hi = tl.where(go, hi, mid)
    return t


@triton.jit
def in_bounds(off, local0, numel, BLOCK: tl.constexpr):
    """True where element ``local0 + off`` lies in ``[0, numel)``, tested on the tile's int32
    offsets (the bounds clamped to ``[0, BLOCK]``): no per-element 64-bit index."""
    lo = tl.minimum(tl.maximum(-local0, 0), BLOCK).to(tl.int32)
    hi = tl.minimum(tl.maximum(numel - local0, 0), BLOCK).to(tl.int32)
    return (off >= lo) & (off < hi)


@triton.jit
def in_ranges(off, like, local0, ranges_ptr, F, BLOCK: tl.constexpr):
    """True where element ``local0 + off`` of a tensor lies in one of the ``F`` element ranges
    ``[lo, hi)`` stored as int64 pairs at ``ranges_ptr``; the bounds are moved into the tile's
    int32 offsets (clamped to ``[0, BLOCK]``) so the per-element test stays 32-bit.  ``like``:
    a float32 tile whose layout the loop-carried result takes (see ``zero_bits``)."""
    hit = zero_bits(like) != 0
    for f in range(F):
        lo = tl.load(ranges_ptr + 2 * f) - local0
        hi = tl.load(ranges_ptr + 2 * f + 1) - local0
        lo = tl.minimum(tl.maximum(lo, 0), BLOCK).to(tl.int32)
        hi = tl.minimum(tl.maximum(hi, 0), BLOCK).to(tl.int32)
        hit = hit | ((off >= lo) & (off < hi))
    return hit


@triton.jit
def zero_bits(x):
    """uint32 zeros in the layout of the float32 tile ``x``.  A loop-carried accumulator
    initialised from a constant gets Triton's default layout (threads along the vector axis),
    and the whole term loop then runs in it: 8x the Philox calls per thread and a layout
    conversion after the loop (seen in the compiled PTX).  Derived from ``x``, it gets ``x``'s
    layout, that of the vector loads; the shifts fold away once the layouts are assigned."""
    return (x.to(tl.uint32, bitcast=True) >> 16) >> 16


@triton.jit
def tile_offsets(ROWS: tl.constexpr, WIDTH: tl.constexpr, VEC: tl.constexpr):
    """int32 offsets of a tile's elements from its first element, in the tile's shape:
    Rademacher ``[4, ROWS, 32 // VEC, VEC]`` (word, row, vector, element), element
    ``row*128 + word*32 + vector*VEC + element``; Gaussian ``[ROWS, WIDTH]``."""
    if WIDTH == 128:
        off = (
            tl.arange(0, 4)[:, None, None, None] * 32
            + tl.arange(0, ROWS)[None, :, None, None] * 128
            + tl.arange(0, 32 // VEC)[None, None, :, None] * VEC
            + tl.arange(0, VEC)[None, None, None, :]
        )
    else:
        off = tl.arange(0, ROWS)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    return off


@triton.jit
def rademacher_signs(first_counter, key, ROWS: tl.constexpr, VEC: tl.constexpr):
    """uint32 tile (shape of ``tile_offsets``) holding 0x80000000 where the Rademacher sign is
    -1 (bit clear) and 0 where it is +1: row ``r`` is Philox counter ``first_counter + r``.
    A thread shifts each word once by its vector's position; the shifts left within a vector
    are constants, so a sign costs one shift and one logical op."""
    ctr = first_counter + tl.arange(0, ROWS).to(tl.int64)
    w0, w1, w2, w3 = philox_counter(ctr, key)
    word = tl.arange(0, 4)[:, None, None, None]  # held by every thread: the selects fold
    w = tl.where(
        word == 0,
        w0[None, :, None, None],
        tl.where(
            word == 1,
            w1[None, :, None, None],
            tl.where(word == 2, w2[None, :, None, None], w3[None, :, None, None]),
        ),
    )
    vec = (tl.arange(0, 32 // VEC) * VEC).to(tl.uint32)[None, None, :, None]
    lane = tl.arange(0, VEC).to(tl.uint32)[None, None, None, :]
    return ((~w >> vec) << (31 - lane)) & 0x80000000


@triton.jit
def direction_tile(first_counter, key, ROWS: tl.constexpr, WIDTH: tl.constexpr, VEC: tl.constexpr):
    """The float32 direction tile (shape of ``tile_offsets``) of the elements from Philox counter
    ``first_counter`` on: Rademacher signs (``WIDTH`` 128, one call per row) or Box-Muller
    normals (``WIDTH`` 4 or 8: one or two calls per row)."""
    if WIDTH == 128:
        z = (rademacher_signs(first_counter, key, ROWS, VEC) | 0x3F800000).to(tl.float32, bitcast=True)
    else:
        tl.static_assert(WIDTH == 4 or WIDTH == 8, "WIDTH is 128 (rademacher), 4 or 8 (gaussian)")
        P: tl.constexpr = WIDTH // 4
        ctr = first_counter + tl.arange(0, ROWS).to(tl.int64)[:, None] * P + tl.arange(0, P)[None, :]
        w0, w1, w2, w3 = philox_counter(ctr, key)
        n0, n1 = _box_muller(w0, w1)
        n2, n3 = _box_muller(w2, w3)
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [ROWS, WIDTH])
    return z


@triton.jit
def round_words_tile(first_element, key, ROWS: tl.constexpr, WIDTH: tl.constexpr, VEC: tl.constexpr):
    """uint32 stochastic-rounding words of the tile starting at element ``first_element`` (a
    multiple of 4), in the shape of ``tile_offsets``: word ``i % 4`` of Philox(counter ``i // 4``)."""
    first = first_element // 4
    if WIDTH == 128:
        Q: tl.constexpr = VEC // 4
        ctr = (
            first
            + tl.arange(0, 4).to(tl.int64)[:, None, None, None] * 8
            + tl.arange(0, ROWS).to(tl.int64)[None, :, None, None] * 32
            + tl.arange(0, 32 // VEC).to(tl.int64)[None, None, :, None] * Q
            + tl.arange(0, Q)[None, None, None, :]
        )
        w0, w1, w2, w3 = philox_counter(ctr, key)
        # join(join(a, c), join(b, d)) flattens to a, b, c, d: the four words of a counter in order
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [4, ROWS, 32 // VEC, VEC])
    else:
        P: tl.constexpr = WIDTH // 4
        ctr = first + tl.arange(0, ROWS).to(tl.int64)[:, None] * P + tl.arange(0, P)[None, :]
        w0, w1, w2, w3 = philox_counter(ctr, key)
        words = tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, WIDTH])
    return words


@triton.jit
def round_to_half(x, words, FP16: tl.constexpr, STOCHASTIC: tl.constexpr):
    """float32 ``x`` rounded to the bf16 (``FP16`` False) or fp16 grid, returned as float32
    values that the narrowing cast represents exactly.  Why not ``x.to(tl.bfloat16)``: the
    CPU interpreter truncates there, the GPU rounds to nearest even; this is the same on
    both.  Stochastic: round up with probability (distance to the lower neighbour) / gap."""
    b = x.to(tl.uint32, bitcast=True)
    sign = b & 0x80000000
    a = b & 0x7FFFFFFF
    if FP16:
        S: tl.constexpr = 13
        MASK: tl.constexpr = 0x1FFF
        KEEP: tl.constexpr = 0xFFFFE000
    else:
        S: tl.constexpr = 16
        MASK: tl.constexpr = 0xFFFF
        KEEP: tl.constexpr = 0xFFFF0000
    if STOCHASTIC:
        inc = words & MASK
    else:
        inc = (MASK >> 1) + ((a >> S) & 1)
    r = (a + inc) & KEEP
    if FP16:
        inf = tl.full(r.shape, 0x7F800000, tl.uint32)
        r = tl.where(r >= 0x47800000, inf, r)  # >= 2**16 is past fp16's max finite 65504
        v = tl.abs(x) * 16777216.0  # fp16 subnormals: a uniform grid of 2**-24
        fl = tl.floor(v)
        frac = v - fl
        if STOCHASTIC:
            up = ((words >> 8).to(tl.float32) * 5.9604644775390625e-08) < frac
        else:
            odd = (fl - 2.0 * tl.floor(fl * 0.5)) == 1.0
            up = (frac > 0.5) | ((frac == 0.5) & odd)
        sub = ((fl + up.to(tl.float32)) * 5.9604644775390625e-08).to(tl.uint32, bitcast=True)
        r = tl.where(a < 0x38800000, sub, r)  # |x| < 2**-14
    r = tl.where(a > 0x7F800000, a, r)  # NaN stays NaN
    return (r | sign).to(tl.float32, bitcast=True)
