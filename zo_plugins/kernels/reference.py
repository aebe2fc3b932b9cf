"""PyTorch reference of the Triton streams and passes (vectorised torch ops, any device).

These functions define what the kernels must compute, materialising every intermediate: they
are for tests, for analysis, and for a PyTorch path that wants the Triton path's Gaussian
stream (``fill_philox_gaussian_``: ~38 ms per million normals on 2 CPU cores, fast on CUDA).
Operation order matches the kernels (and, for Rademacher directions, ``core.passes``), so
integer streams, Rademacher passes and roundings agree bit for bit; Gaussian values agree up
to the last-ulp differences of log/cos/sin between math libraries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.noise import fill_direction_, philox4x32
from .streams import GAUSSIAN_GROUP, TWO_PI_F32, philox_key, round_key

__all__ = [
    "philox_words",
    "fill_philox_gaussian_",
    "direction",
    "round_words",
    "round_to",
    "merge_update_terms",
    "reference_pass",
]

_INV_2_24 = 2.0**-24


def philox_words(first: int, count: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(count, 4)`` int64 tensor of the Philox-4x32-10 words for counters ``first ..``."""
    counters = torch.arange(first, first + count, device=device, dtype=torch.int64)
    return torch.stack(philox4x32(counters, key), dim=1)


def _box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = ((wa >> 8) + 1).to(torch.float32) * _INV_2_24  # (0, 1]: log never sees 0
    u2 = (wb >> 8).to(torch.float32) * _INV_2_24  # [0, 1)
    rad = torch.sqrt(-2.0 * torch.log(u1))
    ang = u2 * torch.tensor(TWO_PI_F32, dtype=torch.float32, device=u2.device)
    return rad * torch.cos(ang), rad * torch.sin(ang)


def fill_philox_gaussian_(out: torch.Tensor, *, seed: int, key: int, offset: int = 0) -> torch.Tensor:
    """Elements ``[offset, offset + out.numel())`` of the Philox/Box-Muller Gaussian stream of
    the tensor with key ``key`` at step seed ``seed``, into the float32 tensor ``out``.
    Chunk-safe: any split of a tensor into (offset, length) requests gives the same values."""
    n = out.numel()
    first = offset // GAUSSIAN_GROUP
    last = (offset + n + GAUSSIAN_GROUP - 1) // GAUSSIAN_GROUP
    w = philox_words(first, last - first, philox_key(seed, key), out.device)
    n0, n1 = _box_muller(w[:, 0], w[:, 1])
    n2, n3 = _box_muller(w[:, 2], w[:, 3])
    z = torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)
    start = offset - first * GAUSSIAN_GROUP
    out.view(-1).copy_(z[start : start + n])
    return out


def direction(
    numel: int,
    *,
    distribution: str,
    seed: int,
    key: int,
    offset: int = 0,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """The float32 direction elements ``[offset, offset + numel)`` of the Triton path's stream:
    Rademacher is the core's stream itself; Gaussian is the Philox/Box-Muller stream."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if distribution == "rademacher":
        return fill_direction_(out, distribution="rademacher", seed=seed, key=key, offset=offset)
    if distribution == "gaussian":
        return fill_philox_gaussian_(out, seed=seed, key=key, offset=offset)
    raise ValueError(f"distribution={distribution!r} is not one of ('gaussian', 'rademacher').")


def round_words(
    numel: int, *, round_seed: int, key: int, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The stochastic-rounding words (uint32 in int64) of elements ``[offset, offset+numel)``."""
    first = offset // 4
    last = (offset + numel + 3) // 4
    w = philox_words(first, last - first, round_key(round_seed, key), device).reshape(-1)
    start = offset - first * 4
    return w[start : start + numel]


def round_to(x: torch.Tensor, dtype: torch.dtype, words: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 ``x`` to ``dtype`` (bf16/fp16) exactly as the kernels do: to nearest even
    when ``words`` is None, else stochastically (up with probability distance / gap, using the
    random 32-bit ``words``).  Integer bit arithmetic, so it is exact on every device."""
    if dtype == torch.float32:
        return x.clone()
    if dtype not in (torch.bfloat16, torch.float16):
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


def merge_update_terms(
    restore: Sequence[tuple[int, float]], update: Sequence[tuple[int, float]], decay: float
) -> list[tuple[int, float]]:
    """``(1 - decay) * (theta + sum(restore)) + sum(update) = (1 - decay) * theta + sum(merged)``
    with each seed once, in first-mention order (as ``core.passes.update_`` merges them)."""
    merged: dict[int, float] = {}
    for seed, coeff in [(s, (1.0 - decay) * c) for s, c in restore] + list(update):
        merged[seed] = merged.get(seed, 0.0) + coeff
    return [(s, c) for s, c in merged.items() if c != 0.0]


def reference_pass(
    theta: torch.Tensor,
    *,
    key: int,
    terms: Sequence[tuple[int, float]],
    distribution: str,
    decay: float = 0.0,
    frozen_rows: Sequence[int] = (),
    threshold: float | None = None,
    round_seed: int | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """What one fused kernel pass writes, as a new tensor (``theta`` is not modified):
    ``x = (1 - decay) * theta + sum(coeff * z(seed))`` in float32, stored in ``out_dtype``
    (default theta's) rounding to nearest even, or stochastically when ``round_seed`` is
    given and the store is bf16/fp16.  Frozen rows, and with ``threshold`` the elements with
    ``|theta| >= threshold``, keep theta's bits."""
    out_dtype = out_dtype or theta.dtype
    flat = theta.detach().reshape(-1)
    n = flat.numel()
    x = flat.to(torch.float32)
    if decay:
        x = x * torch.tensor(1.0 - decay, dtype=torch.float32)
    acc = None
    for seed, coeff in terms:
        z = direction(n, distribution=distribution, seed=seed, key=key, device=flat.device)
        cz = torch.tensor(coeff, dtype=torch.float32) * z
        acc = cz if acc is None else acc + cz
    if acc is not None:
        x = x + acc
    if out_dtype in (torch.bfloat16, torch.float16):
        words = (
            None if round_seed is None else round_words(n, round_seed=round_seed, key=key, device=flat.device)
        )
        new = round_to(x, out_dtype, words)
    else:
        new = x.to(out_dtype)
    keep = torch.zeros(n, dtype=torch.bool, device=flat.device)
    if frozen_rows and theta.dim():
        row = n // max(theta.shape[0], 1)
        for r in frozen_rows:
            keep[r * row : (r + 1) * row] = True
    if threshold is not None:
        keep |= ~(flat.to(torch.float32).abs() < torch.tensor(threshold, dtype=torch.float32))
    same = flat.to(out_dtype) if flat.dtype != out_dtype else flat
    return torch.where(keep, same, new).reshape(theta.shape)
