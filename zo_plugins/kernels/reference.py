"""PyTorch reference of the Triton streams and passes (vectorised torch ops, any device).

These functions define what the kernels must compute, materialising every intermediate: they
are for tests and for analysis.  The streams and the rounding themselves are defined in the
core (``core.noise``, ``core.rounding``) and re-exported here.
Operation order matches the kernels (and, for Rademacher directions, ``core.passes``), so
integer streams, Rademacher passes and roundings agree bit for bit; Gaussian values agree up
to the last-ulp differences of log/cos/sin between math libraries.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..core.noise import fill_direction_, fill_philox_gaussian_, philox_words, round_words
from ..core.passes import merge_terms
from ..core.rounding import round_to

__all__ = [
    "philox_words",
    "fill_philox_gaussian_",
    "direction",
    "round_words",
    "round_to",
    "merge_update_terms",
    "reference_pass",
]


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


def merge_update_terms(
    restore: Sequence[tuple[int, float]], update: Sequence[tuple[int, float]], decay: float
) -> list[tuple[int, float]]:
    """``(1 - decay) * (theta + sum(restore)) + sum(update) = (1 - decay) * theta + sum(merged)``
    with each seed once, in first-mention order (``core.passes.merge_terms``)."""
    return merge_terms(restore, update, restore_scale=1.0 - decay)


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
