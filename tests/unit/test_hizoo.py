"""HiZOO (estimator='hizoo', optimizer='hizoo'): the diagonal Hessian estimate from one extra
forward, checked against autograd's diagonal on a quadratic in float64, and the
preconditioned probes and step."""

import copy
import math

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot

from zo_plugins import ZOOptimizer, replay
from zo_plugins.core.optimizer import materialize_direction

D, EPS = 6, 1e-3
HIZOO = dict(estimator="hizoo", optimizer="hizoo")


class Quadratic(nn.Module):
    """f(θ) = ½ θᵀAθ + bᵀθ with A symmetric positive definite and ill-conditioned."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
        self.register_buffer("A", q @ torch.diag(torch.logspace(-1, 1.5, D, dtype=torch.float64)) @ q.T)
        self.register_buffer("b", torch.randn(D, generator=g, dtype=torch.float64))
        self.theta = nn.Parameter(torch.randn(D, generator=g, dtype=torch.float64))

    def forward(self):
        t = self.theta
        return 0.5 * t @ self.A @ t + self.b @ t


def with_hessian(opt, model, h):
    """Seed the optimizer's diagonal Hessian state (as if earlier steps had learnt ``h``)."""
    opt.state[model.theta]["hessian"] = h.clone()
    opt.state[model.theta]["step"] = 1
    opt._plan = None


H0 = torch.tensor([0.5, 2.0, 1.0, 4.0, 0.25, 1.5], dtype=torch.float64)


@pytest.mark.parametrize("perturbation", ["in-place", "out-of-place"])
def test_hizoo_probes_are_preconditioned_and_measure_the_quadratic_form(perturbation):
    """At θ ± ε H^-1/2 z: g = (L+ - L-)/2ε = ∇f·v and c = ΔL/2ε² = ½ vᵀAv with v = H^-1/2 z,
    exactly on a quadratic (to float64 rounding)."""
    model = Quadratic()
    opt = ZOOptimizer(model, lr=0.0, eps=EPS, perturbation=perturbation, **HIZOO)
    with_hessian(opt, model, H0)
    for step in range(3):
        est = opt.estimate(model, step=step)
        z = materialize_direction(opt, model.theta, step=step).double()
        v = z / H0.sqrt()
        theta = model.theta.detach()
        grad = model.A @ theta + model.b
        g, c = est.projected_grads
        assert g == pytest.approx(float(grad @ v), rel=1e-7)
        assert c == pytest.approx(float(0.5 * v @ model.A @ v), rel=1e-6)


def test_hizoo_hessian_estimate_is_unbiased_against_autograd_on_a_quadratic():
    """The paper's estimate Ĥ = c · H (z² - 1), averaged over many directions at a fixed θ and H,
    is autograd's Hessian diagonal; the released code's |c| · H z² is not (it adds ½ H tr(H^-1 A))."""
    model = Quadratic()
    diag = torch.autograd.functional.hessian(
        lambda t: 0.5 * t @ model.A @ t + model.b @ t, model.theta.detach()
    )
    diag = torch.diagonal(diag)
    opt = ZOOptimizer(model, lr=0.0, eps=EPS, perturbation="out-of-place", **HIZOO)
    with_hessian(opt, model, H0)
    paper, code = [], []
    for step in range(3000):
        est = opt.estimate(model, step=step)
        c = est.projected_grads[1]
        z = materialize_direction(opt, model.theta, step=step).double()
        paper.append(c * H0 * (z * z - 1))
        code.append(abs(c) * H0 * z * z)
    paper, code = torch.stack(paper), torch.stack(code)
    se = paper.std(0) / math.sqrt(len(paper))
    assert ((paper.mean(0) - diag).abs() < 4 * se).all(), (paper.mean(0), diag, se)
    bias = 0.5 * H0 * torch.trace(model.A / H0[:, None])  # ½ H_i tr(H^-1 A)
    torch.testing.assert_close(code.mean(0), diag + bias, rtol=0.1, atol=0)
    assert ((code.mean(0) - diag).abs() > 5 * se).all()


@pytest.mark.parametrize("estimate", ["paper", "code"])
def test_hizoo_step_updates_the_hessian_then_moves_along_its_inverse_square_root(estimate):
    model = Quadratic()
    opt = ZOOptimizer(
        model, lr=1e-2, eps=EPS, weight_decay=0.1, hessian_smooth=0.3, hessian_estimate=estimate, **HIZOO
    )
    with_hessian(opt, model, H0)
    theta = model.theta.detach().clone()
    z = materialize_direction(opt, model.theta, step=0).double()
    opt.step(model)
    g, c = opt.last_step.projected_grads
    h_hat = c * H0 * (z * z - 1) if estimate == "paper" else abs(c) * H0 * z * z
    h_new = 0.7 * H0 + 0.3 * h_hat.abs()
    torch.testing.assert_close(opt.state[model.theta]["hessian"], h_new, rtol=1e-12, atol=0)
    expected = theta * (1 - 1e-2 * 0.1) - 1e-2 * g * z / h_new.sqrt()
    torch.testing.assert_close(model.theta.detach(), expected, rtol=0, atol=1e-12)


def test_hizoo_state_is_one_float32_buffer_the_size_of_the_trainable_set():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    x = torch.randn(8, 5)
    opt = ZOOptimizer(model, lr=1e-3, **HIZOO)
    for _ in range(2):
        opt.step(lambda: model(x).pow(2).mean())
    buffers = [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    assert sum(b.numel() * b.element_size() for b in buffers) == 4 * sum(
        p.numel() for p in model.parameters()
    )
    assert all(b.dtype == torch.float32 for b in buffers)
    assert all((opt.state[p]["hessian"] != 1).any() for p in model.parameters()), "H is learnt"


def test_hizoo_masked_elements_keep_their_bits_and_their_hessian():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(50, 40), nn.Tanh(), nn.Linear(40, 1))
    x = torch.randn(8, 50)
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=1e-2, sparsity=0.75, hessian_smooth=0.5, **HIZOO)
    opt.step(lambda: model(x).pow(2).mean())
    w = model[0].weight
    moved = w != before["0.weight"]
    h = opt.state[w]["hessian"]
    assert 0.2 < moved.float().mean() < 0.3
    assert torch.equal(h[~moved], torch.ones_like(h[~moved])) and (h[moved] != 1).all()


def test_hizoo_refuses_what_it_cannot_serve():
    model = Quadratic()
    before = params_snapshot(model)
    with pytest.raises(ValueError, match="use estimator='hizoo'"):
        ZOOptimizer(model, lr=1e-3, optimizer="hizoo")
    with pytest.raises(ValueError, match="use optimizer='hizoo'"):
        ZOOptimizer(model, lr=1e-3, estimator="hizoo")
    with pytest.raises(ValueError, match="no diagonal information"):
        ZOOptimizer(model, lr=1e-3, distribution="rademacher", **HIZOO)
    with pytest.raises(ValueError, match="distribution='gaussian'"):
        ZOOptimizer(model, lr=1e-3, distribution="sphere", **HIZOO)
    with pytest.raises(ValueError, match="backend='auto' or 'torch'"):
        ZOOptimizer(model, lr=1e-3, backend="triton", **HIZOO)
    with pytest.raises(ValueError, match="hessian_smooth"):
        ZOOptimizer(model, lr=1e-3, hessian_smooth=1.0, **HIZOO)
    assert_bit_identical(before, params_snapshot(model))


@pytest.mark.parametrize("perturbation", ["in-place", "out-of-place"])
def test_hizoo_run_replays_from_its_trajectory_and_resumes_bit_exactly(tmp_path, perturbation):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    start = params_snapshot(net)
    x = torch.randn(8, 5)
    log = tmp_path / "hizoo.zot"
    kw = dict(lr=1e-2, hessian_smooth=0.2, perturbation=perturbation, **HIZOO)
    opt = ZOOptimizer(net, trajectory_path=str(log), **kw)
    for step in range(4):
        if step == 2:
            mid, sd = params_snapshot(net), copy.deepcopy(opt.state_dict())  # state_dict shares tensors
        opt.step(lambda: net(x).pow(2).mean())
    opt.close()
    ref = params_snapshot(net)

    torch.manual_seed(0)
    fresh = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1))
    assert_bit_identical(start, params_snapshot(fresh))
    replay(fresh, log)  # H is re-derived from the recorded gradients and curvatures
    assert_bit_identical(ref, params_snapshot(fresh))

    with torch.no_grad():
        for n, p in fresh.named_parameters():
            p.copy_(mid[n])
    resumed = ZOOptimizer(fresh, **kw)
    resumed.load_state_dict(sd)  # H travels with the checkpoint
    for _ in range(2):
        resumed.step(lambda: fresh(x).pow(2).mean())
    assert_bit_identical(ref, params_snapshot(fresh))
