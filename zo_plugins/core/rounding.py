"""Rounding float32 results to bfloat16 / float16: to nearest even, or stochastically.

Defined once, in integer arithmetic on the float32 bit pattern, so every backend (the PyTorch
passes on any device, the Triton kernels, their reference) rounds every element identically:

* nearest even: add ``half - 1 + lsb`` of the discarded bits, then truncate;
* stochastic: add the low bits of a random 32-bit word (``core.noise.round_words``), then
  truncate -- the value rounds up with probability (distance to the lower neighbour) / gap,
  quantised to 2**-16 (bf16) / 2**-13 (fp16), so E[rounded] = x to that resolution;
* fp16 subnormals (|x| < 2**-14) on their uniform 2**-24 grid, overflow to inf, NaN kept.

The Triton kernels implement the same steps in ``kernels/philox.py::round_to_half``; a test
compares them element by element.
"""

from __future__ import annotations

import torch

from .noise import round_words

__all__ = ["HALF_DTYPES", "round_to", "stochastic_round_"]

HALF_DTYPES = (torch.float16, torch.bfloat16)
_INV_2_24 = 2.0**-24


def round_to(x: torch.Tensor, dtype: torch.dtype, words: torch.Tensor | None = None) -> torch.Tensor:
    """float32 ``x`` rounded to ``dtype`` (bf16/fp16): to nearest even when ``words`` is None,
    else stochastically with the random 32-bit ``words`` (uint32 values in int64, one per
    element).  float32 ``dtype`` returns a copy."""
    if dtype == torch.float32:
        return x.clone()
    if dtype not in HALF_DTYPES:
        raise ValueError(f"round_to rounds to bfloat16 or float16, not {dtype}.")
    b = x.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = b & 0x80000000
    a = b & 0x7FFFFFFF
    s, mask = (13, 0x1FFF) if dtype == torch.float16 else (16, 0xFFFF)
    inc = (words & mask) if words is not None else (mask >> 1) + ((a >> s) & 1)
    r = (a + inc) & (0xFFFFFFFF ^ mask)
    if dtype == torch.float16:
        r = torch.where(r >= 0x47800000, torch.full_like(r, 0x7F800000), r)  # >= 2**16: inf
        v = x.abs() * 16777216.0  # fp16 subnormals: a uniform grid of 2**-24
        fl = torch.floor(v)
        frac = v - fl
        if words is not None:
            up = ((words >> 8).to(torch.float32) * _INV_2_24) < frac
        else:
            odd = (fl - 2.0 * torch.floor(fl * 0.5)) == 1.0
            up = (frac > 0.5) | ((frac == 0.5) & odd)
        sub = ((fl + up.to(torch.float32)) * _INV_2_24).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
        r = torch.where(a < 0x38800000, sub, r)  # |x| < 2**-14
    r = torch.where(a > 0x7F800000, a, r)  # NaN stays NaN
    r = r | sign
    r = torch.where(r >= 1 << 31, r - (1 << 32), r)
    return r.to(torch.int32).view(torch.float32).to(dtype)


def stochastic_round_(dst: torch.Tensor, x: torch.Tensor, *, seed: int, key: int, offset: int) -> None:
    """Store float32 ``x`` (elements ``[offset, offset + x.numel())`` of the tensor with key
    ``key``) into the half-precision ``dst``, rounding stochastically with the words of
    ``round_seed = seed`` (unbiased: E[dst] = x).  Costs ~40 ns per element in PyTorch ops on
    2 CPU cores (the Philox words); the Triton kernels draw the same words in registers."""
    words = round_words(x.numel(), round_seed=seed, key=key, offset=offset, device=x.device)
    dst.copy_(round_to(x.float(), dst.dtype, words))
