"""The ZO method family: each estimator, update rule, sparsity mode and block-wise descent
checked for its defining property."""

import math

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot, tiny_batch, tiny_hf_model

from zo_plugins import ZOOptimizer
from zo_plugins.core.estimators import cge_coordinates
from zo_plugins.core.optimizer import materialize_direction


@pytest.fixture
def quad():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.randn(24, 1, dtype=torch.float64)
    return model, (lambda: ((model(x) - y) ** 2).mean())


def grad_vec(model, loss_fn):
    return torch.autograd.grad(loss_fn(), list(model.parameters()))


def dir_deriv(opt, model, loss_fn, step=0, query=0):
    return sum(
        (g * materialize_direction(opt, p, step=step, query=query).double()).sum()
        for g, p in zip(grad_vec(model, loss_fn), model.parameters())
    ).item()


# ------------------------------------------------------------------------- estimators
def test_forward_difference_shares_the_unperturbed_loss(quad):
    model, loss_fn = quad
    calls = []
    opt = ZOOptimizer(model, lr=0.0, eps=1e-7, estimator="forward", n_queries=3)
    opt._validated = True  # count only the estimate's own forwards
    est = opt.estimate(lambda: calls.append(1) or loss_fn())
    opt.restore()
    assert len(calls) == 1 + 3, "one unperturbed forward shared by the three directions"
    for q in range(3):
        assert est.projected_grads[q] == pytest.approx(dir_deriv(opt, model, loss_fn, query=q), rel=1e-5)


@pytest.mark.parametrize("kind", ["mlp", "opt"])
def test_forward_grad_is_the_exact_directional_derivative(quad, kind):
    if kind == "mlp":
        model, loss_fn = quad
    else:
        model = tiny_hf_model("opt", dtype=torch.float64)
        batch = tiny_batch("opt")
        loss_fn = lambda: model(input_ids=batch["input_ids"]).logits.pow(2).mean()  # noqa: E731
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=0.0, estimator="forward-grad", n_queries=2)
    est = opt.estimate(loss_fn)
    assert_bit_identical(before, params_snapshot(model))
    for q in range(2):
        assert est.projected_grads[q] == pytest.approx(dir_deriv(opt, model, loss_fn, query=q), rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_cge_estimates_coordinates_and_updates_only_them(quad, dtype):
    model, _ = quad
    model = model.to(dtype)
    x = torch.randn(24, 6, dtype=torch.float64).to(dtype)

    def loss_fn():
        return model(x).double().pow(2).mean()

    opt = ZOOptimizer(
        model, lr=0.1, eps=1e-6 if dtype == torch.float64 else 1e-2, estimator="cge", cge_coordinates=5
    )
    coords = cge_coordinates(opt.plan(0), opt.config)
    before = params_snapshot(model)
    est = opt.estimate(loss_fn)
    assert_bit_identical(before, params_snapshot(model))  # probing restores exactly
    if dtype == torch.float64:
        grads = dict(zip([id(p) for p in model.parameters()], grad_vec(model, loss_fn)))
        for (spec, i), g in zip(coords, est.projected_grads):
            assert g == pytest.approx(grads[id(spec.param)].reshape(-1)[i].item(), rel=1e-6, abs=1e-9)
    opt.apply_update(est.projected_grads)
    touched = {(spec.name, i) for spec, i in coords}
    for name, p in model.named_parameters():
        changed = (p.detach().reshape(-1) != before[name].reshape(-1)).nonzero().reshape(-1).tolist()
        assert {(name, i) for i in changed} <= touched


def test_rank_uses_only_the_ordering(quad):
    model, loss_fn = quad
    opt = ZOOptimizer(model, lr=0.0, eps=1e-3, estimator="rank", n_queries=4)
    est = opt.estimate(loss_fn)
    opt.restore()
    coefs = [g / 4 for g in est.projected_grads]
    assert sum(coefs) == pytest.approx(0.0, abs=1e-12)
    order = sorted(range(4), key=lambda j: est.losses_plus[j])
    assert [coefs[j] for j in order] == sorted(coefs), "the best candidate gets the most negative weight"
    assert sorted(coefs) == pytest.approx([-0.5, -1 / 6, 1 / 6, 0.5])

    # a custom oracle that ranks in reverse flips the update
    rev = ZOOptimizer(
        model,
        lr=0.0,
        eps=1e-3,
        estimator="rank",
        n_queries=4,
        ranking_oracle=lambda outs: sorted(range(4), key=lambda j: -float(outs[j])),
    )
    est2 = rev.estimate(loss_fn)
    rev.restore()
    assert est2.projected_grads == pytest.approx([-g for g in est.projected_grads])
    bad = ZOOptimizer(model, lr=0.0, estimator="rank", n_queries=3, ranking_oracle=lambda outs: [0, 0, 1])
    with pytest.raises(ValueError, match="permutation"):
        bad.estimate(loss_fn)


def test_rank_descends(quad):
    model, loss_fn = quad
    start = loss_fn().item()
    opt = ZOOptimizer(model, lr=2e-2, eps=1e-3, estimator="rank", n_queries=4)
    for _ in range(150):
        opt.step(loss_fn)
    assert loss_fn().item() < 0.9 * start


def test_maximize_flips_the_projected_gradient(quad):
    model, loss_fn = quad
    first = ZOOptimizer(model, lr=0.0, eps=1e-6)
    a = first.estimate(loss_fn)
    first.restore()
    opt = ZOOptimizer(model, lr=0.0, eps=1e-6, maximize=True)
    b = opt.estimate(loss_fn)
    opt.restore()
    assert b.projected_grads[0] == pytest.approx(-a.projected_grads[0], rel=1e-9)


# ------------------------------------------------------------------------- update rules
def _step_and_direction(model, loss_fn, **kw):
    before = params_snapshot(model)
    opt = ZOOptimizer(model, eps=1e-6, perturbation="out-of-place", **kw)
    opt.step(loss_fn)
    g = opt.last_step.projected_grad
    d = {n: g * materialize_direction(opt, p, step=0).double() for n, p in model.named_parameters()}
    return opt, before, d


def test_sign_rule_moves_every_element_by_exactly_lr(quad):
    model, loss_fn = quad
    opt, before, d = _step_and_direction(model, loss_fn, lr=1e-3, optimizer="zo-sgd-sign")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] - 1e-3 * d[n].sign(), rtol=0, atol=1e-15)


def test_adam_first_steps_match_the_formula(quad):
    model, loss_fn = quad
    lr, (b1, b2), e = 1e-3, (0.9, 0.999), 1e-8
    opt = ZOOptimizer(
        model, lr=lr, eps=1e-6, optimizer="zo-adam", perturbation="out-of-place", weight_decay=0.01
    )
    m = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    v = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    expected = params_snapshot(model)
    for t in range(1, 3):
        opt.step(loss_fn)
        g = opt.last_step.projected_grad
        for n, p in model.named_parameters():
            d = g * materialize_direction(opt, p, step=t - 1).double()
            m[n] = b1 * m[n] + (1 - b1) * d
            v[n] = b2 * v[n] + (1 - b2) * d * d
            upd = (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + e)
            expected[n] = expected[n] * (1 - lr * 0.01) - lr * upd
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), expected[n], rtol=0, atol=1e-12)
    assert set(opt.state[next(model.parameters())]) >= {"exp_avg", "exp_avg_sq"}


def test_momentum_buffer_and_stateless_history_agree(quad):
    model, loss_fn = quad
    start = params_snapshot(model)
    results = []
    for history in (0, 60):  # 0.5 ** 60 is below float64 resolution
        model.load_state_dict(start)
        opt = ZOOptimizer(
            model,
            lr=1e-3,
            eps=1e-6,
            optimizer="zo-sgd-momentum",
            momentum=0.5,
            momentum_history=history,
            perturbation="out-of-place",
        )
        for _ in range(5):
            opt.step(loss_fn)
        results.append(params_snapshot(model))
        if history:
            assert not opt.state, "stateless momentum keeps no buffer"
        else:
            assert "momentum_buffer" in opt.state[next(model.parameters())]
    for n in results[0]:
        torch.testing.assert_close(results[0][n], results[1][n], rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "optimizer,kw", [("zo-adam", {}), ("zo-sgd-momentum", {}), ("zo-sgd-momentum", {"momentum_history": 3})]
)
def test_stateful_rules_resume_bit_exactly(optimizer, kw):
    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1))

    x = torch.randn(16, 5, generator=torch.Generator().manual_seed(2))
    ref = make()
    opt = ZOOptimizer(ref, lr=1e-2, optimizer=optimizer, **kw)
    for _ in range(6):
        opt.step(lambda: ref(x).pow(2).mean())
    a = make()
    opt = ZOOptimizer(a, lr=1e-2, optimizer=optimizer, **kw)
    for _ in range(3):
        opt.step(lambda: a(x).pow(2).mean())
    sd = (params_snapshot(a), opt.state_dict())
    b = make()
    b.load_state_dict(sd[0])
    opt = ZOOptimizer(b, lr=1e-2, optimizer=optimizer, **kw)
    opt.load_state_dict(sd[1])
    for _ in range(3):
        opt.step(lambda: b(x).pow(2).mean())
    assert_bit_identical(params_snapshot(ref), params_snapshot(b))


def test_conservative_rejects_updates_that_make_the_loss_worse(quad):
    model, loss_fn = quad
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=50.0, eps=1e-4, optimizer="zo-sgd-conservative", perturbation="out-of-place")
    for _ in range(3):
        opt.step(loss_fn)
    assert opt.rejected_steps == 3 and opt.last_step.rejected
    assert_bit_identical(before, params_snapshot(model))
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-4, optimizer="zo-sgd-conservative")
    losses = [loss_fn().item()]
    for _ in range(20):
        opt.step(loss_fn)
        losses.append(loss_fn().item())
    assert opt.rejected_steps < 20
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), "accepted steps never increase the loss"


# ------------------------------------------------------------------------- sparsity, blocks
@pytest.mark.parametrize("mode", ["magnitude", "random"])
def test_sparsity_fraction_and_untouched_weights(mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 300), nn.Tanh(), nn.Linear(300, 1))  # 60k and 300 weights
    x = torch.randn(8, 200)
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=1e-2, sparsity=0.8, sparsity_mode=mode, sparsity_resample_every=100)
    opt.plan(0)
    w = model[0].weight
    z = materialize_direction(opt, w, step=0)
    frac = (z != 0).float().mean().item()
    assert frac == pytest.approx(0.2, abs=0.01)
    if mode == "magnitude":  # exactly the smallest weights (tensor <= 65536 elements)
        assert w[z != 0].abs().max() <= w[z == 0].abs().min()
    for _ in range(3):
        prev = model[0].weight.detach().clone()
        opt.step(lambda: model(x).pow(2).mean())
        step_moved = model[0].weight != prev
        assert step_moved.float().mean().item() <= 0.2 + 0.01  # each step touches its mask only
    moved = model[0].weight != before["0.weight"]
    if mode == "random":  # the same mask for all steps (resampled every 100)
        assert torch.equal(moved, z != 0)
    assert torch.equal(model[0].weight[~moved], before["0.weight"][~moved])


def test_block_wise_cycle_updates_one_layer_per_step():
    model = tiny_hf_model("opt")
    batch = tiny_batch("opt")
    opt = ZOOptimizer(model, lr=1e-2, block_wise="cycle", perturbation="out-of-place")
    blocks = [[s.name for s in b] for b in opt._blocks]
    assert any(all(n.startswith("model.decoder.layers.1.") for n in b) for b in blocks)
    for t in range(len(blocks)):
        before = params_snapshot(model)
        opt.step(lambda: model(**batch).loss)
        after = params_snapshot(model)
        changed = {n for n in before if not torch.equal(before[n], after[n])}
        assert changed and changed <= set(blocks[t % len(blocks)]), t


def test_every_rule_is_finite_on_a_real_model():
    for optimizer in ("zo-sgd", "zo-sgd-momentum", "zo-sgd-sign", "zo-sgd-conservative", "zo-adam"):
        model = tiny_hf_model("llama")
        batch = tiny_batch("llama")
        opt = ZOOptimizer(model, lr=1e-3, optimizer=optimizer)
        for _ in range(2):
            opt.step(lambda: model(**batch).loss)
        assert all(torch.isfinite(p).all() for p in model.parameters()), optimizer
        assert math.isfinite(opt.last_step.loss_plus)


def test_user_mask_limits_perturbation_and_update():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1))
    x = torch.randn(8, 6)
    before = params_snapshot(model)

    def first_row_only(name, param, step):
        if name != "0.weight":
            return None
        m = torch.zeros_like(param, dtype=torch.bool)
        m[0] = True
        return m

    opt = ZOOptimizer(model, lr=1e-1, mask_fn=first_row_only)
    for _ in range(3):
        opt.step(lambda: model(x).pow(2).mean())
    w = model[0].weight
    assert not torch.equal(w[0], before["0.weight"][0])
    assert torch.equal(w[1:], before["0.weight"][1:]), "masked-out rows keep their bits"
    assert not torch.equal(model[2].weight, before["2.weight"]), "None means dense"
    bad = ZOOptimizer(model, lr=1e-1, mask_fn=lambda n, p, s: torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool tensor of shape"):
        bad.step(lambda: model(x).pow(2).mean())


# ------------------------------------------------------------------------- sphere directions
def test_sphere_directions_have_norm_sqrt_d_and_the_spsa_estimate_is_their_derivative(quad):
    model, loss_fn = quad
    d = sum(p.numel() for p in model.parameters())
    opt = ZOOptimizer(model, lr=0.0, eps=1e-6, distribution="sphere", n_queries=2)
    est = opt.estimate(loss_fn)
    opt.restore()
    for q in range(2):
        z = torch.cat(
            [materialize_direction(opt, p, step=0, query=q).double().reshape(-1) for p in model.parameters()]
        )
        assert z.norm().item() == pytest.approx(math.sqrt(d), rel=1e-6)
        assert est.projected_grads[q] == pytest.approx(dir_deriv(opt, model, loss_fn, query=q), rel=1e-5)
    # the two directions are the Gaussian ones rescaled, not the same direction
    za = materialize_direction(opt, model[0].weight, step=0, query=0)
    zb = materialize_direction(opt, model[0].weight, step=0, query=1)
    assert not torch.allclose(za, zb)


def test_sphere_update_moves_along_the_probed_direction(quad):
    model, loss_fn = quad
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-6, distribution="sphere")
    opt.step(loss_fn)
    g = opt.last_step.projected_grad
    for name, p in model.named_parameters():
        z = materialize_direction(opt, p, step=0).double()
        # materialize_direction rounds scale * z to float32: ~1e-7 relative of an update ~1e-3
        torch.testing.assert_close(p.detach(), before[name] - 1e-3 * g * z, rtol=0, atol=1e-9)


def test_sphere_norm_counts_only_perturbed_coordinates():
    torch.manual_seed(0)
    emb = nn.Embedding(10, 4, padding_idx=0).double()  # row 0 frozen
    opt = ZOOptimizer(emb, lr=0.0, distribution="sphere", sparsity=0.5, sparsity_mode="random")
    opt.estimate(lambda: emb(torch.arange(10)).pow(2).sum())
    opt.restore()
    z = materialize_direction(opt, emb.weight, step=0).double()
    on = int((z != 0).sum())
    assert torch.count_nonzero(z[0]) == 0
    assert 5 < on < 36
    assert z.norm().item() == pytest.approx(math.sqrt(on), rel=1e-6)  # z is rounded to float32
