"""The fused sign / momentum / Adam update kernel against the PyTorch rule of the core
(``core.updates.rule_update_``): weights and optimizer state, over shapes, dtypes, frozen rows,
restore terms, weight decay and consecutive steps."""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import GAUSSIAN_ULP, assert_bitwise, assert_close, triton_or_skip

triton_or_skip()

from zo_plugins.core.noise import tensor_key  # noqa: E402
from zo_plugins.core.passes import ParamSpec  # noqa: E402
from zo_plugins.core.updates import init_state, rule_update_  # noqa: E402
from zo_plugins.kernels.rules import triton_rule_update_foreach_  # noqa: E402

S1, S2, S3 = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888, 0x0123_4567_89AB_CDEF
HYPER = dict(momentum=0.9, betas=(0.9, 0.99), adam_eps=1e-6)


def _pair(shape, dtype, frozen=(), name="w"):
    g = torch.Generator().manual_seed(len(shape) + shape[0])
    theta = (torch.randn(shape, generator=g) * 0.02).to(dtype)
    a = ParamSpec(theta.clone(), name, tensor_key(name), frozen_rows=tuple(frozen))
    b = ParamSpec(theta.clone(), name, tensor_key(name), frozen_rows=tuple(frozen))
    return theta, a, b


def _run_both(rule, a, b, steps, dist, wd, round_seed=None):
    sa, sb = init_state(rule, a.param), init_state(rule, b.param)
    for t in range(1, steps + 1):
        restore = [(S3 + t, 1e-3)] if t == 1 else []
        grads = [(S1 + t, 0.7), (S2 + t, -1.3)]
        common = dict(rule=rule, restore=restore, grads=grads, lr=1e-3, weight_decay=wd, **HYPER)
        rule_update_(
            a, state=sa, adam_step=t, distribution=dist, chunk_size=1 << 20, round_seed=round_seed, **common
        )
        triton_rule_update_foreach_(
            [b], states=[sb], steps=[t], distribution=dist, round_seed=round_seed, **common
        )
    return sa, sb


def _check_weights(rule, got, want):
    """Bit for bit, except Adam's weights: PyTorch's vectorised CPU sqrt is not correctly
    rounded (it differs from IEEE sqrt in ~1 of 5 float32 elements), the kernel's sqrt_rn is.
    The difference is then one ulp of the step; stored in bf16/fp16 it can cross a rounding
    boundary and move the weight one grid step."""
    if rule != "adam":
        assert_bitwise(got, want, f"{rule} weights")
        return
    step = 1e-3 * 1.01  # lr times a bound of the bias-corrected Adam step
    assert_close(got, want, "adam weights", atol=4 * step * 2**-23 + 1e-12, rtol=torch.finfo(got.dtype).eps)


@pytest.mark.parametrize("rule", ["sign", "momentum", "adam"])
@pytest.mark.parametrize("shape,frozen", [((1,), ()), ((129,), ()), ((7, 61), (0, 4))], ids=str)
def test_rule_kernel_matches_pytorch_rule_bit_for_bit_with_rademacher(rule, shape, frozen):
    theta, a, b = _pair(shape, torch.float32, frozen)
    sa, sb = _run_both(rule, a, b, steps=3, dist="rademacher", wd=0.1)
    _check_weights(rule, b.param, a.param)
    for k in sa:
        assert_bitwise(sb[k], sa[k], f"{rule} state {k}")
    assert not torch.equal(b.param, theta), "the update must move the weights"
    for r in frozen:
        assert_bitwise(b.param[r], theta[r], f"frozen row {r}")


@pytest.mark.parametrize("rule", ["sign", "momentum", "adam"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_rule_kernel_half_precision_rounds_to_nearest_like_pytorch(rule, dtype):
    theta, a, b = _pair((5, 77), dtype, frozen=(2,))
    sa, sb = _run_both(rule, a, b, steps=2, dist="rademacher", wd=0.0)
    _check_weights(rule, b.param, a.param)
    for k in sa:
        assert_bitwise(sb[k], sa[k], f"{rule} state {k}")
    assert_bitwise(b.param[2], theta[2], "frozen row")


@pytest.mark.parametrize("rule", ["momentum", "adam"])
def test_rule_kernel_gaussian_matches_the_philox_stream_of_the_pytorch_path(rule):
    theta, a, b = _pair((3, 300), torch.float32)
    sa, sb = _run_both(rule, a, b, steps=2, dist="gaussian-philox", wd=0.1)
    # directions differ by <= GAUSSIAN_ULP float32 ulps (log/cos of two math libraries), i.e.
    # by <= GAUSSIAN_ULP * 2**-23 * |z| with |z| < 6; the gradient sums two directions with
    # |coefficients| 0.7 + 1.3 = 2, so the state differs by at most ~2 * 6 * GAUSSIAN_ULP ulps
    # of one (where terms cancel, the relative difference can be large, the absolute one not)
    bound = 2 * 2 * 6 * GAUSSIAN_ULP * 2**-23
    for k in sa:
        assert_close(sb[k], sa[k], f"{rule} state {k}", atol=bound, rtol=1e-6)
    assert_close(b.param, a.param, f"{rule} weights", atol=1e-2 * bound, rtol=1e-6)
    assert (b.param != theta).float().mean() > 0.99


def test_rule_kernel_stochastic_rounding_is_unbiased():
    # bf16 weights at 1.5 (ulp 2**-7 on both sides) and a sign step of lr = 2**-10: RNE would
    # never move them; stochastic rounding moves ~1/8 of them by one ulp, the mean by ~lr
    n = 1 << 14
    spec = ParamSpec(torch.full((n,), 1.5, dtype=torch.bfloat16), "w", tensor_key("w"))
    triton_rule_update_foreach_(
        [spec],
        rule="sign",
        restore=[],
        grads=[(S1, 1.0)],
        lr=2**-10,
        weight_decay=0.0,
        states=[{}],
        distribution="rademacher",
        round_seed=S2,
    )
    moved = spec.param.float() - 1.5
    assert set(moved.unique().tolist()) <= {-(2**-7), 0.0, 2**-7}
    assert abs(moved.mean().item()) < 2**-10 * 1.3 and moved.abs().sum() > 0
    # the expected change is -lr * sign(z); its mean over the tensor is ~0, so compare per sign
    z = torch.empty(n)
    from zo_plugins.core.noise import fill_direction_

    fill_direction_(z, distribution="rademacher", seed=S1, key=spec.key)
    up = moved[z < 0].mean().item()  # sign(d) = -1 there: theta += lr
    assert abs(up - 2**-10) < 0.25 * 2**-10


def test_rule_kernel_one_launch_for_many_tensors_equals_one_per_tensor():
    specs_a = [ParamSpec(torch.randn(n) * 0.1, f"t{n}", tensor_key(f"t{n}")) for n in (1, 3, 130, 257)]
    specs_b = [ParamSpec(s.param.clone(), s.name, s.key) for s in specs_a]
    st_a = [init_state("adam", s.param) for s in specs_a]
    st_b = [init_state("adam", s.param) for s in specs_b]
    kw = dict(
        rule="adam", restore=[], grads=[(S1, 0.5)], lr=1e-2, weight_decay=0.0, distribution="rademacher"
    )
    triton_rule_update_foreach_(specs_a, states=st_a, steps=[1] * 4, **kw)
    for s, st in zip(specs_b, st_b):
        triton_rule_update_foreach_([s], states=[st], steps=[1], **kw)
    for x, y in zip(specs_a, specs_b):
        assert_bitwise(x.param, y.param, x.name)


def test_rule_kernel_rejects_a_missing_state_before_writing():
    spec = ParamSpec(torch.zeros(10), "w", tensor_key("w"))
    with pytest.raises(ValueError, match="exp_avg"):
        triton_rule_update_foreach_(
            [spec],
            rule="adam",
            restore=[],
            grads=[(S1, 1.0)],
            lr=1.0,
            weight_decay=0.0,
            states=[{}],
            distribution="rademacher",
        )
    assert torch.count_nonzero(spec.param) == 0


@pytest.mark.parametrize("rule", ["sign", "momentum", "adam"])
def test_rule_kernel_magnitude_mask_matches_the_pytorch_mask(rule):
    from zo_plugins.core.sparsity import MagnitudeMask

    theta, a, b = _pair((4, 99), torch.float32)
    thr = float(theta.abs().reshape(-1).kthvalue(150).values)  # ~38% of the elements
    a.mask = MagnitudeMask(a.param, thr)
    sa, sb = init_state(rule, a.param), init_state(rule, b.param)
    common = dict(rule=rule, restore=[], grads=[(S1, 0.7)], lr=1e-3, weight_decay=0.1, **HYPER)
    rule_update_(a, state=sa, adam_step=1, distribution="rademacher", chunk_size=1 << 20, **common)
    triton_rule_update_foreach_(
        [b],
        states=[sb],
        steps=[1],
        distribution="rademacher",
        magnitude_threshold=a.mask.kernel_threshold,
        **common,
    )
    _check_weights(rule, b.param, a.param)
    for k in sa:
        assert_bitwise(sb[k], sa[k], f"{rule} state {k}")
    outside = theta.abs() > thr
    assert_bitwise(b.param[outside], theta[outside], "weights outside the mask")
    assert int((b.param != theta).sum()) == 150


@pytest.mark.parametrize("rule", ["sign", "momentum", "adam"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_rule_kernel_lr_zero_leaves_weights_bit_identical(rule, dtype):
    theta, _, b = _pair((3, 50), dtype)
    st = init_state(rule, b.param)
    for t in (1, 2):
        triton_rule_update_foreach_(
            [b],
            rule=rule,
            restore=[],
            grads=[(S1 + t, 0.9)],
            lr=0.0,
            weight_decay=0.1,
            states=[st],
            steps=[t],
            distribution="gaussian",
            round_seed=S2,
            **HYPER,
        )
    assert_bitwise(b.param, theta, f"{rule} {dtype} lr=0")
    for v in st.values():
        assert torch.count_nonzero(v) > 0, "the state still accumulates"
