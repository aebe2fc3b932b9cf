"""Sparse MeZO as its paper defines it (sparsity_threshold='initial'): each tensor's threshold
is the exact quantile of its pretrained |θ|, fixed for the run and checkpointed; the mask
|θ| <= h is evaluated on the current weights."""

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot

from zo_plugins import ZOOptimizer, replay
from zo_plugins.core.optimizer import materialize_direction


def model_and_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 300), nn.Tanh(), nn.Linear(300, 1))  # 90,000 > the 65,536 sample
    x = torch.randn(8, 300)
    return model, (lambda: model(x).pow(2).mean())


def test_initial_threshold_is_the_exact_quantile_of_the_pretrained_weights_and_stays():
    model, loss = model_and_loss()
    w = model[0].weight
    h0 = float(w.detach().abs().flatten().kthvalue(round(0.25 * w.numel())).values)
    opt = ZOOptimizer(model, lr=0.5, sparsity=0.75)  # a large lr: the weights move visibly
    per_step = ZOOptimizer(nn.Sequential(*model), lr=0.0, sparsity=0.75, sparsity_threshold="per-step")
    for step in range(4):
        z = materialize_direction(opt, w, step=step)
        assert opt._thresholds["0.weight"] == h0, "fixed at the pretrained weights' quantile"
        assert torch.equal(z != 0, w.detach().abs() <= h0), "the mask is |θ| <= h on the current weights"
        opt.step(loss)
    assert (w.detach().abs() <= h0).float().mean().item() != pytest.approx(0.25, abs=1e-4), (
        "the fraction follows θ"
    )
    per_step.plan(0)
    assert per_step._specs[0][0].mask.threshold != h0, (
        "per-step re-estimates it (from a sample) on current weights"
    )


def test_initial_thresholds_travel_with_the_checkpoint_and_the_run_replays(tmp_path):
    model, loss = model_and_loss()
    start = params_snapshot(model)
    log = tmp_path / "run.zot"
    opt = ZOOptimizer(model, lr=0.5, sparsity=0.75, trajectory_path=str(log))
    for _ in range(2):
        opt.step(loss)
    sd, mid = opt.state_dict(), params_snapshot(model)
    for _ in range(2):
        opt.step(loss)
    opt.close()
    ref = params_snapshot(model)

    resumed, loss2 = model_and_loss()
    with torch.no_grad():
        for n, p in resumed.named_parameters():
            p.copy_(mid[n])
    opt2 = ZOOptimizer(resumed, lr=0.5, sparsity=0.75)
    opt2.load_state_dict(sd)
    assert opt2._thresholds == opt._thresholds, "not recomputed from the moved weights"
    for _ in range(2):
        opt2.step(loss2)
    assert_bit_identical(ref, params_snapshot(resumed))

    fresh, _ = model_and_loss()
    assert_bit_identical(start, params_snapshot(fresh))
    replay(fresh, log)
    assert_bit_identical(ref, params_snapshot(fresh))


def test_a_zero_initialised_tensor_gets_threshold_zero_warns_and_stops_after_one_update():
    """LoRA's B starts at 0: its initial threshold is 0, the first update moves every element
    off 0, and |θ| <= 0 then selects none -- the run warns; 'per-step' keeps training it."""
    torch.manual_seed(0)
    model = nn.Module()
    model.A = nn.Parameter(torch.randn(4, 8) * 0.5)
    model.B = nn.Parameter(torch.zeros(8, 4))
    x, y = torch.randn(16, 8), torch.randn(16, 8)

    def loss():
        return (x @ model.A.T @ model.B.T - y).pow(2).mean()

    opt = ZOOptimizer(model, lr=1e-1, eps=1e-2, sparsity=0.75)
    with pytest.warns(UserWarning, match="'B'.*threshold is 0"):
        opt.step(loss)
    assert opt._thresholds["B"] == 0.0 and opt._thresholds["A"] > 0
    assert (model.B.detach() != 0).all(), "the first step moves every zero element"
    before = model.B.detach().clone()
    for _ in range(3):
        opt.step(loss)
    assert torch.equal(model.B.detach(), before), "then none is selected again"

    model.B.data.zero_()
    per_step = ZOOptimizer(model, lr=1e-1, eps=1e-2, sparsity=0.75, sparsity_threshold="per-step")
    per_step.step(loss)
    before = model.B.detach().clone()
    per_step.step(loss)
    assert not torch.equal(model.B.detach(), before), "per-step re-estimates h and keeps training B"
