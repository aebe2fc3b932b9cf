"""Helpers of the kernel tests (tolerances, bitwise asserts); conftest.py sets TRITON_INTERPRET."""

from __future__ import annotations

import pytest
import torch

TOL = {
    # max |triton - reference| allowed for Gaussian passes, per stored dtype: the directions
    # differ by <= GAUSSIAN_ULP float32 ulps; a stored half value may then land one grid step
    # away (the rounding boundary is crossed), so the half tolerances are one ulp of the value.
    torch.float32: dict(atol=1e-6, rtol=1e-6),
    torch.bfloat16: dict(atol=1e-6, rtol=2**-7),
    torch.float16: dict(atol=1e-6, rtol=2**-10),
}
GAUSSIAN_ULP = 8
"""Bound on the Triton-vs-reference difference of Philox-Gaussian directions, in float32 ulps
(measured: at most 5 over 8.4M normals, interpreter vs PyTorch CPU; docs/triton.md)."""


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
