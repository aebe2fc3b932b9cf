"""FZOO (estimator='fzoo'): one-sided probes around the unperturbed loss, the step divided by
the spread of the probed losses, and the probes evaluated in one batched pass."""

import math

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot, tiny_batch, tiny_hf_model

from zo_plugins import ZOCallback, ZOOptimizer, replay
from zo_plugins.core.optimizer import materialize_direction

N, LR, EPS = 4, 1e-2, 1e-4


def quadratic_mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 12), nn.Tanh(), nn.Linear(12, 1)).double()
    x = torch.randn(24, 6, dtype=torch.float64)
    y = torch.randn(24, 1, dtype=torch.float64)

    def closure(copies=None, scale=1.0):
        if copies is None:
            return scale * ((model(x) - y) ** 2).mean()
        out = model(x.repeat(copies, 1))
        return scale * ((out - y.repeat(copies, 1)) ** 2).view(copies, -1).mean(1)

    return model, closure


def loss_at(model, closure, deltas):
    """The closure's loss at theta + deltas (deltas: name -> tensor), weights put back."""
    named = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in deltas.items():
            named[n].add_(d)
        value = closure().item()
        for n, d in deltas.items():
            named[n].sub_(d)
    return value


def test_fzoo_probes_one_sided_around_the_unperturbed_loss():
    model, closure = quadratic_mlp()
    calls = []
    opt = ZOOptimizer(model, lr=0.0, eps=EPS, estimator="fzoo", n_queries=N, perturbation="out-of-place")
    est = opt.estimate(lambda: calls.append(1) or closure())
    assert len(calls) == N + 1, "N probes and one unperturbed loss"
    assert est.losses_minus == [closure().item()] * N
    for q in range(N):
        z = {
            n: EPS * materialize_direction(opt, p, step=0, query=q).double()
            for n, p in model.named_parameters()
        }
        assert est.losses_plus[q] == pytest.approx(loss_at(model, closure, z), rel=1e-12)
        minus = {n: -d for n, d in z.items()}
        assert est.losses_plus[q] != pytest.approx(loss_at(model, closure, minus), rel=1e-9), "never at θ-εz"


@pytest.mark.parametrize("perturbation", ["in-place", "out-of-place"])
def test_fzoo_step_is_divided_by_the_spread_of_the_probed_losses(perturbation):
    """θ' = θ - lr/N Σ_i (l_i - l_0)/σ z_i with σ the population std of the N probed losses;
    the applied coefficients (l_i - l_0)/σ have standard deviation exactly 1."""
    model, closure = quadratic_mlp()
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=LR, eps=EPS, estimator="fzoo", n_queries=N, perturbation=perturbation)
    opt.step(closure)
    est = opt.last_step
    base, probed = est.loss_minus, None
    assert math.isfinite(base)
    g = est.projected_grads
    mean = sum(g) / N
    assert math.sqrt(sum((v - mean) ** 2 for v in g) / N) == pytest.approx(1.0, abs=1e-12)
    # recompute the losses and the step by hand
    l0 = loss_at(model, closure, {n: before[n] - p.detach() for n, p in model.named_parameters()})
    dirs = [
        {n: materialize_direction(opt, p, step=0, query=q).double() for n, p in model.named_parameters()}
        for q in range(N)
    ]
    probed = [
        loss_at(
            model,
            closure,
            {n: before[n] - p.detach() + EPS * dirs[q][n] for n, p in model.named_parameters()},
        )
        for q in range(N)
    ]
    sigma = math.sqrt(sum((v - sum(probed) / N) ** 2 for v in probed) / N)
    coef = [(v - l0) / sigma for v in probed]
    assert g == pytest.approx(coef, rel=1e-6)
    for n, p in model.named_parameters():
        expected = before[n] - LR / N * sum(c * d[n] for c, d in zip(coef, dirs))
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-12)


def test_fzoo_update_does_not_depend_on_the_loss_scale():
    """Normalised SGD: scaling the loss by 1000 leaves FZOO's step unchanged (MeZO's grows 1000x)."""
    moved = {}
    for method in ("fzoo", "spsa"):
        for scale in (1.0, 1000.0):
            model, closure = quadratic_mlp()
            before = params_snapshot(model)
            kw = dict(estimator="fzoo", n_queries=N) if method == "fzoo" else {}
            opt = ZOOptimizer(model, lr=1e-6, eps=EPS, perturbation="out-of-place", **kw)
            opt.step(lambda s=scale: closure(scale=s))
            moved[method, scale] = {n: p.detach() - before[n] for n, p in model.named_parameters()}
    for n in moved["fzoo", 1.0]:
        torch.testing.assert_close(moved["fzoo", 1000.0][n], moved["fzoo", 1.0][n], rtol=1e-7, atol=0)
        torch.testing.assert_close(moved["spsa", 1000.0][n], 1000 * moved["spsa", 1.0][n], rtol=1e-6, atol=0)


def test_fzoo_takes_no_step_when_the_losses_do_not_spread():
    model, closure = quadratic_mlp()
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=1.0, estimator="fzoo", n_queries=N, perturbation="out-of-place")
    opt.step(lambda: closure() * 0 + 3.0)  # a flat objective: σ = 0
    assert opt.last_step.projected_grads == [0.0] * N and not opt.last_step.skipped
    assert_bit_identical(before, params_snapshot(model))


def _lm_closure(model, batch):
    def closure(copies=None):
        b = batch if copies is None else {k: v.repeat(copies, 1) for k, v in batch.items()}
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        labels = b["input_ids"][:, 1:]
        ce = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
        return ce.mean() if copies is None else ce.view(copies, -1).mean(1)

    return closure


@pytest.mark.parametrize("trainable", ["all", "lora"])
def test_batched_copies_equal_the_sequential_probes_in_one_closure_call(trainable):
    """Linear layers in one bmm, RMSNorm and the embedding copy by copy: the same N + 1 losses
    as N + 1 separate forwards, the same step, one closure call."""
    runs = {}
    for batched in (False, True):
        model = tiny_hf_model("llama", dtype=torch.float64)
        if trainable == "lora":
            peft = pytest.importorskip("peft")
            model = peft.get_peft_model(
                model,
                peft.LoraConfig(
                    r=2, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, init_lora_weights=False
                ),
            )
        batch = tiny_batch("llama")
        closure = _lm_closure(model, batch)
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-3, estimator="fzoo", n_queries=3, batched_copies=batched)
        est = opt.estimate(closure)
        opt.step(closure)
        runs[batched] = est, params_snapshot(model)
    (seq, seq_w), (bat, bat_w) = runs[False], runs[True]
    assert seq.calls == 4 and bat.calls == 1
    assert bat.losses_plus == pytest.approx(seq.losses_plus, rel=1e-12)
    assert bat.losses_minus == pytest.approx(seq.losses_minus, rel=1e-12)
    assert len(set(bat.losses_plus)) == 3, "each copy saw its own perturbation"
    for n in seq_w:
        torch.testing.assert_close(bat_w[n], seq_w[n], rtol=0, atol=1e-12)


def test_fzoo_refuses_what_it_cannot_serve_before_any_weight_changes():
    model, closure = quadratic_mlp()
    before = params_snapshot(model)
    with pytest.raises(ValueError, match="n_queries >= 2"):
        ZOOptimizer(model, lr=LR, estimator="fzoo")
    with pytest.raises(ValueError, match="batched copies serve estimator='fzoo'"):
        ZOOptimizer(model, lr=LR, batched_copies=True)
    with pytest.raises(ValueError, match="needs the model"):
        ZOOptimizer(list(model.parameters()), lr=LR, estimator="fzoo", n_queries=2, batched_copies=True)
    with pytest.raises(ValueError, match="ZOOptimizer.step"):
        ZOCallback(estimator="fzoo", n_queries=2, batched_copies=True)
    opt = ZOOptimizer(model, lr=LR, estimator="fzoo", n_queries=2, batched_copies=True)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        opt.step(lambda copies=None: closure() if copies is None else closure(copies).mean())
    assert_bit_identical(before, params_snapshot(model))


@pytest.mark.parametrize(
    "kw", [{"perturbation": "in-place"}, {"perturbation": "out-of-place"}, {"batched_copies": True}]
)
def test_fzoo_run_replays_from_its_trajectory_bit_exactly(tmp_path, kw):
    model, closure = quadratic_mlp()
    log = tmp_path / "fzoo.zot"
    opt = ZOOptimizer(model, lr=LR, eps=EPS, estimator="fzoo", n_queries=N, trajectory_path=str(log), **kw)
    for _ in range(3):
        opt.step(closure)
    opt.close()
    fresh, _ = quadratic_mlp()
    replay(fresh, log)
    assert_bit_identical(params_snapshot(model), params_snapshot(fresh))
