"""Wrong inputs a user will produce: each gets one clear sentence naming the value and the
fix, raised before any weight changes."""

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot

from zo_plugins import ZOConfig, ZOOptimizer


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1))


X = torch.randn(8, 4)

CONSTRUCTION = [
    ({"lr": -1.0}, ValueError, r"Invalid lr: -1\.0"),
    ({"lr": float("nan")}, ValueError, "Invalid lr"),
    ({"lr": 1e-3, "weight_decay": -0.1}, ValueError, "Invalid weight_decay"),
    ({"lr": 1e-3, "eps": 0.0}, ValueError, r"ZOConfig\.eps=0\.0 is invalid: use a finite number > 0"),
    ({"lr": 1e-3, "eps": -1e-3}, ValueError, "ZOConfig.eps=-0.001"),
    ({"lr": 1e-3, "eps": float("inf")}, ValueError, "ZOConfig.eps=inf"),
    ({"lr": 1e-3, "distribution": "normal"}, ValueError, "'gaussian', 'rademacher'"),
    ({"lr": 1e-3, "dropout": "off"}, ValueError, "'same-masks', 'eval'"),
    ({"lr": 1e-3, "perturbation": "fast"}, ValueError, "'auto', 'in-place', 'out-of-place'"),
    ({"lr": 1e-3, "n_queries": 0}, ValueError, "n_queries=0 is invalid"),
    ({"lr": 1e-3, "n_queries": 1.5}, ValueError, "n_queries=1.5"),
    ({"lr": 1e-3, "seed": -3}, ValueError, "seed=-3"),
    ({"lr": 1e-3, "chunk_size": 1000}, ValueError, "multiple of 65536"),
    ({"lr": 1e-3, "clip_projected_grad": 0}, ValueError, "clip_projected_grad=0"),
    ({"lr": 1e-3, "stochastic_rounding": "yes"}, ValueError, "stochastic_rounding='yes'"),
    ({"lr": 1e-3, "epsilon": 1e-3}, TypeError, r"unknown argument\(s\) \['epsilon'\]"),
    ({"lr": 1e-3, "gaussian_stream": "mt"}, ValueError, "gaussian_stream='mt'.*'auto', 'philox', 'native'"),
    (
        {"lr": 1e-3, "gaussian_stream": "native", "backend": "triton"},
        ValueError,
        "use gaussian_stream='philox'",
    ),
]


@pytest.mark.parametrize("kwargs,exc,match", CONSTRUCTION, ids=[str(c[0]) for c in CONSTRUCTION])
def test_bad_settings_are_refused(kwargs, exc, match):
    m = model()
    before = params_snapshot(m)
    with pytest.raises(exc, match=match):
        ZOOptimizer(m, **kwargs)
    assert_bit_identical(before, params_snapshot(m))


def test_zoconfig_errors_name_the_field():
    with pytest.raises(ValueError, match=r"ZOConfig\.distribution='uniform' is not valid: choose one of"):
        ZOConfig(distribution="uniform")


def test_no_trainable_parameters():
    m = model().requires_grad_(False)
    with pytest.raises(ValueError, match="no parameters"):
        ZOOptimizer(m, lr=1e-3)
    with pytest.raises(ValueError, match="no parameters"):
        ZOOptimizer([], lr=1e-3)


def test_meta_device_and_integer_parameters():
    with torch.device("meta"):
        m = nn.Linear(4, 1)
    with pytest.raises(ValueError, match="meta device"):
        ZOOptimizer(m, lr=1e-3)
    with pytest.raises(ValueError, match="floating-point"):
        ZOOptimizer([torch.zeros(3, dtype=torch.int64)], lr=1e-3)


def test_parameters_not_in_the_model():
    with pytest.raises(ValueError, match="does not belong to `model`"):
        ZOOptimizer([nn.Parameter(torch.zeros(3))], lr=1e-3, model=model())


CLOSURES = [
    (lambda m: lambda: m(X), ValueError, r"scalar loss; it returned a tensor of shape \(8, 1\)"),
    (lambda m: lambda: "loss", TypeError, "not str"),
    (lambda m: lambda: torch.enable_grad().__enter__() or m(X).sum(), ValueError, "requires grad"),
    (lambda m: lambda: 1 / 0, ZeroDivisionError, "division"),
]


@pytest.mark.parametrize("mode", ["in-place", "out-of-place"])
@pytest.mark.parametrize("make_closure,exc,match", CLOSURES, ids=["non-scalar", "string", "grad", "raises"])
def test_bad_closures_leave_weights_bit_identical(mode, make_closure, exc, match):
    if mode == "out-of-place" and match == "requires grad":
        # out of place the forward runs on perturbed copies that never require grad, so a
        # closure that enables grad builds no graph over the weights: nothing to refuse
        make_closure, exc, match = CLOSURES[0]
    m = model()
    before = params_snapshot(m)
    opt = ZOOptimizer(m, lr=1e-3, perturbation=mode)
    try:
        with pytest.raises(exc, match=match):
            opt.step(make_closure(m))
    finally:
        torch.set_grad_enabled(True)
    assert_bit_identical(before, params_snapshot(m))
    assert opt.step_count == 0


def test_step_without_closure():
    with pytest.raises(ValueError, match="needs a closure"):
        ZOOptimizer(model(), lr=1e-3).step()


def test_apply_update_with_the_wrong_number_of_gradients():
    opt = ZOOptimizer(model(), lr=1e-3, n_queries=2)
    with pytest.raises(ValueError, match="got 1 projected gradients; this configuration"):
        opt.apply_update([1.0])
    with pytest.raises(ValueError, match="Non-finite"):
        opt.apply_update([1.0, float("nan")])


def test_exploding_projected_gradient_is_clipped_and_counted():
    m = model()
    opt = ZOOptimizer(m, lr=1e-3, clip_projected_grad=0.5, perturbation="out-of-place")
    calls = iter([10.0, -10.0])  # L+, L- (out of place: no validation call)  ->  g = 20 / 2e-3 = 1e4
    before = params_snapshot(m)
    opt.step(lambda: m(X).sum() * 0 + next(calls))
    assert opt.last_step.clipped and opt.clipped_steps == 1
    assert opt.last_step.projected_grad == 0.5
    moved = max((p - before[n]).abs().max().item() for n, p in m.named_parameters())
    assert 0 < moved < 1e-2  # an unclipped step would have moved weights by ~10
