"""The Triton streams: Rademacher bit-identical to the core, Gaussian within an ulp bound of
its PyTorch reference, both independent of BLOCK, chunking and visiting order."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from kernel_helpers import GAUSSIAN_ULP, assert_bitwise, max_ulp_diff, triton_or_skip

triton = triton_or_skip()
tl = pytest.importorskip("triton.language")

from zo_plugins.core.noise import fill_direction_, mix64  # noqa: E402
from zo_plugins.kernels import reference as ref  # noqa: E402
from zo_plugins.kernels.passes import triton_direction  # noqa: E402
from zo_plugins.kernels.philox import round_to_half  # noqa: E402
from zo_plugins.kernels.streams import SR_SALT, philox_keys, round_key  # noqa: E402

SEED, KEY = 0x1234_5678_9ABC_DEF0, 0xFEDC_BA98_7654_3210


def _z(n, dist, seed=SEED, key=KEY, offset=0, block=None):
    return triton_direction(
        n, distribution=dist, seed=seed, key=key, offset=offset, device="cpu", block=block
    )


def test_vectorised_keys_equal_core_mix64():
    keys = [0, 1, 2**63, 2**64 - 1, KEY, 12345]
    got = philox_keys(SEED, keys).view(np.uint64).tolist()
    assert got == [mix64(SEED, k) for k in keys]
    got = philox_keys(SEED, keys, salt=SR_SALT).view(np.uint64).tolist()
    assert got == [round_key(SEED, k) for k in keys]


@pytest.mark.parametrize(
    ("n", "offset"), [(1, 0), (127, 0), (128, 0), (129, 0), (615, 0), (3000, 0), (300, 77), (1, 4095)]
)
def test_rademacher_is_bit_identical_to_the_core_stream(n, offset):
    core = fill_direction_(
        torch.empty(n), distribution="rademacher", seed=SEED, key=KEY, offset=offset, numel=offset + n
    )
    assert_bitwise(_z(n, "rademacher", offset=offset), core, f"rademacher n={n} offset={offset}")


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_same_seed_same_bits_across_block_sizes(dist):
    n = 1000
    z128 = _z(n, dist, block=128)
    for block in (256, 1024, 4096):
        assert_bitwise(_z(n, dist, block=block), z128, f"{dist} block={block} vs 128")


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_a_shard_generates_exactly_its_slice(dist):
    full = _z(1000, dist)
    for lo, hi in [(0, 1), (3, 517), (128, 1000), (999, 1000)]:
        assert_bitwise(_z(hi - lo, dist, offset=lo), full[lo:hi], f"{dist} shard [{lo}, {hi})")


def test_gaussian_within_ulp_bound_of_the_pytorch_reference():
    n = 1 << 17
    got = _z(n, "gaussian", block=1 << 15)
    want = ref.direction(n, distribution="gaussian", seed=SEED, key=KEY)
    ulps = max_ulp_diff(got, want)
    assert ulps <= GAUSSIAN_ULP, f"max ulp difference {ulps} > {GAUSSIAN_ULP}"
    # the integer and uniform parts are exact and only log/cos/sin differ by an ulp here and
    # there (a third of the elements on the interpreter vs PyTorch CPU; possibly none where both
    # sides use the same math library, as on a GPU): most elements must agree bit for bit
    differ = (got != want).float().mean().item()
    assert differ < 0.5, differ


def test_gaussian_reference_is_chunk_invariant():
    full = ref.direction(1001, distribution="gaussian", seed=SEED, key=KEY)
    parts = [
        ref.direction(hi - lo, distribution="gaussian", seed=SEED, key=KEY, offset=lo)
        for lo, hi in [(0, 3), (3, 130), (130, 1001)]
    ]
    assert_bitwise(torch.cat(parts), full, "reference chunks")


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_direction_moments(dist):
    n = 1 << 16
    z = _z(n, dist, block=1 << 14).double()
    se = 1 / math.sqrt(n)
    assert abs(z.mean().item()) < 5 * se
    var_se = math.sqrt(2 / n) if dist == "gaussian" else 1e-12
    assert abs(z.var().item() - 1) < 5 * var_se + (5 * se if dist == "rademacher" else 0)
    if dist == "gaussian":
        assert abs(((z - z.mean()) ** 4).mean().item() / z.var().item() ** 2 - 3) < 0.1  # kurtosis
        assert abs((z.abs() < 1).double().mean().item() - 0.6827) < 0.01
    else:
        assert set(z.unique().tolist()) == {-1.0, 1.0}


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_independent_across_tensors_and_steps(dist):
    n = 1 << 14
    base = _z(n, dist, seed=SEED, key=KEY, block=1 << 13)
    others = {
        "next key": _z(n, dist, seed=SEED, key=KEY + 1, block=1 << 13),
        "next step": _z(n, dist, seed=SEED + 1, key=KEY, block=1 << 13),
        "shifted by one": torch.roll(base, 1),
    }
    for what, other in others.items():
        corr = torch.corrcoef(torch.stack([base, other]).double())[0, 1].item()
        assert abs(corr) < 5 / math.sqrt(n), f"{dist}: correlation {corr:.4f} with {what}"


# --------------------------------------------------------------------------- rounding


@triton.jit
def _round_kernel(
    x_ptr, w_ptr, out_ptr, n, FP16: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    w = tl.load(w_ptr + offs, mask=m, other=0).to(tl.uint32)
    tl.store(out_ptr + offs, round_to_half(x, w, FP16, STOCHASTIC), mask=m)


def _kernel_round(x, dtype, words=None):
    out = torch.empty_like(x)
    w = torch.zeros(x.numel(), dtype=torch.int64) if words is None else words
    _round_kernel[(triton.cdiv(x.numel(), 4096),)](
        x, w, out, x.numel(), FP16=dtype == torch.float16, STOCHASTIC=words is not None, BLOCK=4096
    )
    return out


def _hard_floats():
    g = torch.Generator().manual_seed(0)
    rnd_bits = torch.randint(-(2**31), 2**31 - 1, (6000,), generator=g, dtype=torch.int64)
    rnd = rnd_bits.to(torch.int32).view(torch.float32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            float("inf"),
            -float("inf"),
            65504.0,
            65519.0,
            65520.0,
            65536.0,
            2**-14,
            2**-24,
            2**-25,
            3 * 2**-26,
            1.5 * 2**-24,
            2.5 * 2**-24,
            1e-45,
            -1e-45,
            3.3895314e38,
            3.4e38,
            1 + 2**-8,
            1 + 3 * 2**-8,
            1 + 2**-11,
            1 + 3 * 2**-11,
            -(1 + 2**-8),
            0.1,
            -2.5e-6,
        ],
        dtype=torch.float32,
    )
    scaled = torch.randn(6000, generator=g) * torch.logspace(-9, 5, 6000)  # the half ranges
    return torch.cat([rnd, special, scaled, scaled * 2**-20])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy: inf * 2**24 in unused lanes
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_round_to_nearest_even_matches_torch_casts(dtype):
    x = _hard_floats()
    want = x.to(dtype).float()
    got_kernel = _kernel_round(x, dtype)
    got_ref = ref.round_to(x, dtype).float()
    nan = want.isnan()
    assert torch.equal(got_kernel.isnan(), nan) and torch.equal(got_ref.isnan(), nan)
    assert_bitwise(got_kernel[~nan], want[~nan], f"kernel RNE {dtype}")
    assert_bitwise(got_ref[~nan], want[~nan], f"reference RNE {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_picks_a_neighbour_and_matches_the_reference(dtype):
    x = _hard_floats()
    x = x[x.isfinite() & (x.abs() < 6e4)]
    words = ref.round_words(x.numel(), round_seed=7, key=KEY)
    got = _kernel_round(x, dtype, words)
    assert_bitwise(got.to(dtype), ref.round_to(x, dtype, words), f"kernel vs reference SR {dtype}")
    lo = torch.where(
        x.to(dtype).float() <= x,
        x.to(dtype),
        torch.nextafter(x.to(dtype), torch.tensor(-math.inf, dtype=dtype)),
    )
    hi = torch.nextafter(lo, torch.tensor(math.inf, dtype=dtype))
    ok = (got == lo.float()) | (got == hi.float())
    assert ok.all(), f"{int((~ok).sum())} values rounded to a non-neighbour, e.g. {x[~ok][:3].tolist()}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_unbiased(dtype):
    lo = torch.tensor(0.02, dtype=dtype)
    gap = (torch.nextafter(lo, torch.tensor(1.0, dtype=dtype)) - lo).float()
    x = torch.full((1 << 15,), lo.float().item() + 0.3 * gap.item())
    words = ref.round_words(x.numel(), round_seed=3, key=KEY)
    got = _kernel_round(x, dtype, words)
    frac_up = ((got - lo.float()) / gap).mean().item()
    assert abs(frac_up - 0.3) < 5 * math.sqrt(0.21 / x.numel()), frac_up
