"""Helpers of the kernel tests (tolerances, bitwise asserts); conftest.py sets TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch

GAUSSIAN_ULP = 8
"""Bound on the Triton-vs-reference difference of Philox-Gaussian directions, in float32 ulps
(measured: at most 5 over 8.4M normals, interpreter vs PyTorch CPU; docs/triton.md)."""
Z_ULP = 2.0**-21
"""The float32 ulp of the largest Box-Muller normal: |z| <= sqrt(-2 ln 2**-24) = 5.77 < 8."""


def gaussian_tol(dtype: torch.dtype, coeffs, want: torch.Tensor) -> dict[str, float]:
    """max |triton - reference| allowed for a Gaussian pass ``theta + sum(c * z)``.  Each
    direction differs by <= GAUSSIAN_ULP ulps of |z| < 8, i.e. by GAUSSIAN_ULP * 2**-21, so
    each term by |c| times that; the float32 sums and the final rounding may then land one ulp
    apart (two ulps of the largest value).  A stored half value may cross a rounding boundary
    and move one grid step: one ulp of the value (rtol)."""
    atol = sum(abs(c) for c in coeffs) * GAUSSIAN_ULP * Z_ULP
    big = want.detach().float().abs().max().item() if want.numel() else 0.0
    atol += 2 * torch.finfo(torch.float32).eps * big
    rtol = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    return dict(atol=atol, rtol=rtol)


def triton_or_skip():
    return pytest.importorskip(
        "triton", reason="triton is not installed: pip install 'zo-plugins[triton]' to run the kernel tests"
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def assert_bitwise(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Bit equality, reporting how many elements differ and where (Liger-style)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{what}: {actual.shape}/{actual.dtype} vs {expected.shape}/{expected.dtype}"
    )
    a = actual.detach().reshape(-1)
    e = expected.detach().reshape(-1)
    isize = a.element_size()
    ia = a.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[isize])
    ie = e.contiguous().view({4: torch.int32, 2: torch.int16, 8: torch.int64}[isize])
    bad = (ia != ie).nonzero().reshape(-1)
    if bad.numel():
        i = bad[:5].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} of {a.numel()} elements differ bitwise; first at {i}: "
            f"{a[i].tolist()} vs {e[i].tolist()}"
        )


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str = "", **tol) -> None:
    a, e = actual.float().reshape(-1), expected.float().reshape(-1)
    bad = ~torch.isclose(a, e, **tol)
    if bad.any():
        idx = bad.nonzero().reshape(-1)[:5].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {a.numel()} elements outside {tol}; first at {idx}: "
            f"{a[idx].tolist()} vs {e[idx].tolist()} (max |diff| {(a - e).abs().max().item():.3g})"
        )


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance between two float32 tensors in units in the last place (counted along
    the monotone integer line of float32 bit patterns, so +tiny vs -tiny counts correctly)."""
    ia = a.detach().float().reshape(-1).contiguous().view(torch.int32).long()
    ib = b.detach().float().reshape(-1).contiguous().view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max().item()) if ia.numel() else 0
