"""ZOOptimizer: the estimate is the directional derivative, updates are exact where they
must be, resume is bit-exact, bad input is refused before any weight changes."""

import logging
import math

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, max_ulp_diff, params_snapshot

from zo_plugins import ZOOptimizer
from zo_plugins.core import passes
from zo_plugins.core.optimizer import materialize_direction


def mse(model, x, y):
    return lambda: ((model(x) - y) ** 2).mean()


def directional_derivative(opt, model, loss_fn, step=0, query=0):
    loss = loss_fn()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    return sum(
        (g * materialize_direction(opt, p, step=step, query=query).to(g.dtype)).sum()
        for g, p in zip(grads, params)
    ).item()


@pytest.mark.parametrize("mode", ["in-place", "out-of-place"])
@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_projected_grad_equals_autograd_directional_derivative(mlp64, mode, dist):
    model, x, y = mlp64
    opt = ZOOptimizer(model, lr=0.0, eps=1e-6, perturbation=mode, distribution=dist)
    est = opt.estimate(mse(model, x, y))
    opt.restore()
    expected = directional_derivative(opt, model, mse(model, x, y))
    assert est.projected_grads[0] == pytest.approx(expected, rel=1e-7, abs=1e-9)


def test_n_queries_average_independent_directions(mlp64):
    model, x, y = mlp64
    opt = ZOOptimizer(model, lr=0.0, eps=1e-6, n_queries=3)
    est = opt.estimate(mse(model, x, y))
    opt.restore()
    seeds = opt.seeds_for(0)
    assert len(set(seeds)) == 3
    for q in range(3):
        expected = directional_derivative(opt, model, mse(model, x, y), query=q)
        assert est.projected_grads[q] == pytest.approx(expected, rel=1e-6, abs=1e-9)


def test_mean_update_aligns_with_negative_gradient(mlp64):
    model, x, y = mlp64
    loss_fn = mse(model, x, y)
    grad = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss_fn(), list(model.parameters()))])
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()
    lr, steps = 1e-5, 1500
    opt = ZOOptimizer(model, lr=lr, eps=1e-6)
    for _ in range(steps):
        opt.step(loss_fn)
    moved = torch.cat([p.detach().reshape(-1) for p in model.parameters()]) - start
    cos = torch.nn.functional.cosine_similarity(moved, -grad, dim=0).item()
    # E[g z] = grad for Gaussian z; 1500 samples in 241 dimensions give cos ~ 0.93 and a
    # norm inflated by sqrt(1 + d/N) ~ 1.08 by the estimator's variance
    assert cos > 0.85, cos
    ratio = moved.norm().item() / (lr * steps * grad.norm().item())
    assert 0.9 < ratio < 1.3, ratio


def test_update_rule_is_sgd_with_weight_decay(mlp64):
    model, x, y = mlp64
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=0.01, eps=1e-6, weight_decay=0.1)
    opt.step(mse(model, x, y))
    g = opt.last_step.projected_grad
    for name, p in model.named_parameters():
        z = materialize_direction(opt, p, step=0).double()
        expected = before[name] - 0.01 * (g * z + 0.1 * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_param_groups_lr_and_scheduler_are_honoured(mlp64):
    model, x, y = mlp64
    first, second = model[0], model[2]
    opt = ZOOptimizer(
        [{"params": first.parameters(), "lr": 0.0}, {"params": second.parameters()}],
        lr=0.01,
        eps=1e-6,
        model=model,
        perturbation="out-of-place",
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5)
    b0 = params_snapshot(first)
    opt.step(mse(model, x, y))
    assert_bit_identical(b0, params_snapshot(first))  # lr=0 group untouched (out-of-place)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.005)
    assert sched.get_last_lr()[1] == pytest.approx(0.005)


def test_frozen_parameters_and_padding_rows_are_bit_identical():
    torch.manual_seed(0)
    emb = nn.Embedding(20, 8, padding_idx=3)
    head = nn.Linear(8, 1)
    model = nn.ModuleDict({"emb": emb, "head": head})
    head.bias.requires_grad_(False)
    ids = torch.tensor([[1, 3, 5, 3], [3, 7, 2, 9]])
    pad_row, bias = emb.weight[3].detach().clone(), head.bias.detach().clone()

    def loss():
        return head(emb(ids)).pow(2).mean()

    for mode in ("in-place", "out-of-place"):
        other_rows = emb.weight.detach().clone()
        opt = ZOOptimizer(model, lr=0.1, eps=1e-2, weight_decay=0.5, perturbation=mode)
        for _ in range(3):
            opt.step(loss)
        assert torch.equal(emb.weight[3], pad_row), mode
        assert torch.equal(head.bias, bias), mode
        assert not torch.equal(emb.weight[1], other_rows[1]), "trainable rows must move"
        z = materialize_direction(opt, emb.weight, step=0)
        assert torch.count_nonzero(z[3]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_lr_zero_out_of_place_is_bit_identical(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)).to(dtype)
    x = torch.randn(16, 64, dtype=dtype)
    before = params_snapshot(model)
    # 'auto' perturbs every dtype out of place when the model is given
    opt = ZOOptimizer(model, lr=0.0, eps=1e-3)
    assert opt.perturbation_mode == "out-of-place"
    for _ in range(3):
        opt.step(lambda: model(x).float().pow(2).mean())
    assert_bit_identical(before, params_snapshot(model))


def test_lr_zero_in_place_float32_within_a_few_ulp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1))
    x = torch.randn(16, 64)
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=0.0, eps=1e-3, perturbation="in-place")
    assert opt.perturbation_mode == "in-place"
    opt.step(lambda: model(x).pow(2).mean())
    worst = max(max_ulp_diff(before[n], p) for n, p in model.named_parameters())
    # +eps, -2eps, +eps in float32: rounding leaves small weights a few ulp off
    assert worst <= 64, worst
    for n, p in model.named_parameters():  # and never more than one ulp of the largest weight
        bound = torch.finfo(torch.float32).eps * before[n].abs().max().item()
        assert (before[n] - p).abs().max().item() <= bound


def test_in_place_refuses_half_precision():
    model = nn.Linear(4, 1).to(torch.bfloat16)
    with pytest.raises(ValueError, match="cannot be perturbed in place"):
        ZOOptimizer(model.parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="cannot be perturbed in place"):
        ZOOptimizer(model, lr=1e-3, perturbation="in-place")


def test_auto_is_out_of_place_with_the_model_and_in_place_without():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8).to(torch.bfloat16), nn.Linear(8, 1))
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    opt = ZOOptimizer(model, lr=0.0)
    assert opt.perturbation_mode == "out-of-place"
    before = params_snapshot(model)
    opt.step(lambda: model[1](model[0](x).float()).pow(2).mean())
    assert_bit_identical(before, params_snapshot(model))  # every dtype, float32 included
    bare = ZOOptimizer(list(model[1].parameters()), lr=0.0)  # no model: no hooks, so in place
    assert bare.perturbation_mode == "in-place"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_half_precision_updates_are_not_lost(dtype):
    torch.manual_seed(0)
    n = 1 << 16
    w = nn.Parameter((torch.randn(n) * 0.02).to(dtype))

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = w

        def forward(self):
            return self.w.sum()

    holder = Holder()
    # g=1 fixed by the closure: L(w + eps z) - L(w - eps z) = 2 eps  =>  projected grad 1
    intended = None
    for sr in (True, False):
        w.data = (torch.randn(n, generator=torch.Generator().manual_seed(1)) * 0.02).to(dtype)
        start = w.detach().float().clone()
        opt = ZOOptimizer(holder, lr=1e-6, eps=1e-3, stochastic_rounding=sr)
        state = {"sign": 1.0, "calls": 0}

        def closure(state=state):
            holder()  # runs the (perturbed) module, as a real loss would
            state["calls"] += 1
            state["sign"] *= -1
            return torch.tensor(-state["sign"] * 1e-3)

        applied = torch.zeros(n)
        expected = torch.zeros(n)
        for t in range(20):
            before = w.detach().float().clone()
            opt.step(closure)
            assert opt.last_step.projected_grad == pytest.approx(1.0)
            applied += w.detach().float() - before
            expected += -1e-6 * materialize_direction(opt, w, step=t)
        del start
        # per-element update 1e-6 is ~1/100 of a bf16 ulp at 0.02
        ratio = (applied * expected.sign()).mean().item() / expected.abs().mean().item()
        if sr:
            intended = ratio
            assert ratio == pytest.approx(1.0, abs=0.1)
        else:
            assert abs(ratio) < 0.5, "round-to-nearest should lose most of the update"
    assert intended is not None


@pytest.mark.parametrize("mode", ["in-place", "out-of-place"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_loss_skips_the_step(mlp64, mode, bad, caplog):
    model, x, y = mlp64
    opt = ZOOptimizer(model, lr=0.1, eps=1e-3, perturbation=mode)
    before = params_snapshot(model)
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        opt.step(lambda: model(x).sum() * bad)
    assert opt.last_step.skipped and opt.skipped_steps == 1
    assert "skipped" in caplog.text
    if mode == "out-of-place":
        assert_bit_identical(before, params_snapshot(model))
    else:  # the perturbation is undone in float64 here: exact up to rounding
        for n, p in model.named_parameters():
            torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-15)
    opt.step(mse(model, x, y))  # training goes on
    assert not opt.last_step.skipped and opt.step_count == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_nan_on_second_forward_also_skips(mlp64):
    model, x, y = mlp64
    opt = ZOOptimizer(model, lr=0.1, eps=1e-3, perturbation="out-of-place")
    before = params_snapshot(model)
    calls = iter([1.0, float("nan")])
    opt.step(lambda: model(x).sum() * 0 + next(calls))
    assert opt.last_step.skipped
    assert_bit_identical(before, params_snapshot(model))


@pytest.mark.parametrize("mode", ["in-place", "out-of-place"])
def test_state_dict_resume_is_bit_exact(mode):
    def make():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        return m, ZOOptimizer(m, lr=1e-2, eps=1e-3, seed=7, perturbation=mode)

    x = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))
    ref, ref_opt = make()
    for _ in range(10):
        ref_opt.step(lambda: ref(x).pow(2).mean())

    a, a_opt = make()
    for _ in range(5):
        a_opt.step(lambda: a(x).pow(2).mean())
    saved_model, saved_opt = a.state_dict(), a_opt.state_dict()
    b, b_opt = make()
    b.load_state_dict(saved_model)
    b_opt.load_state_dict(saved_opt)
    assert b_opt.step_count == 5
    for _ in range(5):
        b_opt.step(lambda: b(x).pow(2).mean())
    assert_bit_identical(params_snapshot(ref), params_snapshot(b))


def test_resume_with_another_seed_is_refused():
    m = nn.Linear(3, 1)
    sd = ZOOptimizer(m, lr=1e-3, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ZOOptimizer(m, lr=1e-3, seed=2).load_state_dict(sd)


def test_chunk_size_does_not_change_results():
    results = []
    for chunk in (1 << 16, 1 << 20):
        torch.manual_seed(0)
        m = nn.Linear(300, 500)  # 150k weights: several 65536-element chunks
        x = torch.randn(4, 300)
        opt = ZOOptimizer(m, lr=1e-3, eps=1e-3, chunk_size=chunk, distribution="gaussian")
        opt.step(lambda: m(x).pow(2).mean())
        results.append(params_snapshot(m))
    assert_bit_identical(*results)


@pytest.mark.parametrize("mode,expected", [("in-place", 3), ("out-of-place", 3)])
def test_three_direction_generations_per_step(monkeypatch, mode, expected):
    """+eps, -2eps, then restore and update fused: each tensor's direction is generated
    three times per step (the reference implementation does four passes)."""
    m = nn.Linear(8, 4, bias=False)
    x = torch.randn(2, 8)
    calls = []
    real = passes.fill_direction_
    monkeypatch.setattr(passes, "fill_direction_", lambda *a, **k: calls.append(1) or real(*a, **k))
    opt = ZOOptimizer(m, lr=1e-3, perturbation=mode)
    opt.step(lambda: m(x).sum())
    assert len(calls) == expected


def test_process_rng_is_not_reseeded(mlp64):
    model, x, y = mlp64  # no dropout: the forwards draw nothing from the global RNG
    state = torch.get_rng_state()
    opt = ZOOptimizer(model, lr=1e-3)
    opt.step(mse(model, x, y))
    assert torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("mode", ["in-place", "out-of-place"])
def test_both_forwards_see_the_same_dropout_masks(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30), nn.Dropout(0.3), nn.Tanh(), nn.Linear(30, 1)).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    loss_fn = lambda: model(x).pow(2).mean()  # noqa: E731
    opt = ZOOptimizer(model, lr=0.0, eps=1e-6, perturbation=mode)
    rng = torch.get_rng_state()
    est = opt.estimate(loss_fn)
    opt.restore()
    torch.set_rng_state(rng)  # autograd with the same mask as the ZO forwards
    expected = directional_derivative(opt, model, loss_fn)
    assert est.projected_grads[0] == pytest.approx(expected, rel=1e-6)


def test_eval_dropout_mode(mlp64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 30), nn.Dropout(0.5), nn.Tanh(), nn.Linear(30, 1)).double()
    x = torch.randn(64, 10, dtype=torch.float64)
    opt = ZOOptimizer(model, lr=0.0, eps=1e-6, dropout="eval")
    est = opt.estimate(lambda: model(x).pow(2).mean())
    opt.restore()
    assert model.training, "training mode must be restored"
    model.eval()
    expected = directional_derivative(opt, model, lambda: model(x).pow(2).mean())
    assert est.projected_grads[0] == pytest.approx(expected, rel=1e-6)


def test_out_of_place_detects_parameters_used_outside_their_module():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 1)

        def forward(self, x):
            return x @ self.lin.weight.t()  # bypasses lin.forward

    m = Sneaky()
    before = params_snapshot(m)
    opt = ZOOptimizer(m, lr=1e-3, perturbation="out-of-place")
    with pytest.raises(RuntimeError, match="never reached"):
        opt.step(lambda: m(torch.ones(2, 4)).sum())
    assert_bit_identical(before, params_snapshot(m))
    # in-place (float32) handles it
    opt = ZOOptimizer(m, lr=1e-3, perturbation="in-place")
    opt.step(lambda: m(torch.ones(2, 4)).sum())
    assert math.isfinite(opt.last_step.projected_grad)


def test_a_closure_that_raises_leaves_in_place_weights_restored(mlp64):
    model, x, y = mlp64
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=0.1, perturbation="in-place")
    calls = iter([None, RuntimeError("boom")])

    def closure():
        err = next(calls)
        if err:
            raise err
        return model(x).sum()

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n], rtol=0, atol=1e-15)
