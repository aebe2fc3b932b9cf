"""Triton device functions: Philox-4x32-10, the direction tiles, stochastic-rounding words and
exact round-to-nearest-even / stochastic rounding of float32 to bf16/fp16.

Tiles are ``[ROWS, GROUP]`` blocks of consecutive elements whose first element is a multiple
of ``GROUP``; one Philox call per row serves the whole row (128 Rademacher signs or 4
normals), so the generator costs one call per 128 (resp. 4) elements instead of one per
element.  Stream definitions: ``streams.py``.
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
def direction_tile(first_counter, key, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """The ``[ROWS, GROUP]`` float32 direction tile whose row ``r`` is Philox counter
    ``first_counter + r``: Rademacher signs (GROUP = 128) or Box-Muller normals (GROUP = 4)."""
    ctr = first_counter + tl.arange(0, ROWS).to(tl.int64)
    w0, w1, w2, w3 = philox_counter(ctr, key)
    if GROUP == 4:
        n0, n1 = _box_muller(w0, w1)
        n2, n3 = _box_muller(w2, w3)
        # join(join(a, c), join(b, d)) flattens to a, b, c, d
        z = tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [ROWS, GROUP])
    else:
        tl.static_assert(GROUP == 128, "GROUP is 4 (gaussian) or 128 (rademacher)")
        col = tl.arange(0, GROUP)[None, :]
        word = col >> 5
        w = tl.where(
            word == 0,
            w0[:, None],
            tl.where(word == 1, w1[:, None], tl.where(word == 2, w2[:, None], w3[:, None])),
        )
        bit = (w >> (col & 31).to(tl.uint32)) & 1
        z = bit.to(tl.float32) * 2.0 - 1.0
    return z


@triton.jit
def round_words_tile(first_element, key, ROWS: tl.constexpr, GROUP: tl.constexpr):
    """``[ROWS, GROUP]`` uint32 stochastic-rounding words of the tile starting at element
    ``first_element`` (a multiple of 4): word ``i % 4`` of Philox(counter ``i // 4``)."""
    Q: tl.constexpr = GROUP // 4
    ctr = first_element // 4 + tl.arange(0, ROWS).to(tl.int64)[:, None] * Q + tl.arange(0, Q)[None, :]
    w0, w1, w2, w3 = philox_counter(ctr, key)
    return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), [ROWS, GROUP])


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
