"""What the split core guarantees beyond the math: groups added mid-run, tensors frozen
mid-run, parameters read outside their module, interrupts during a pass, the learning-rate
warning, ZO's grad_norm, ranking raw outputs, and the accelerate launch check."""

from __future__ import annotations

import logging
import math
import signal

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot, tiny_batch, tiny_hf_model

from zo_plugins import ZOOptimizer
from zo_plugins.core import distributed
from zo_plugins.core.optimizer import materialize_direction


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def loss_of(m):
    return lambda: m(X).pow(2).mean()


# ----------------------------------------------------------------------------- param groups
def test_a_group_added_after_two_steps_trains_from_the_next_step_with_its_lr():
    m = mlp()
    opt = ZOOptimizer(list(m[0].parameters()), lr=1e-2, model=m)
    for _ in range(2):
        opt.step(loss_of(m))
    head_before = params_snapshot(m[2])
    opt.add_param_group({"params": list(m[2].parameters()), "lr": 0.5})
    assert [s.name for s in opt.specs()][-2:] == ["2.weight", "2.bias"]
    body_before = params_snapshot(m)
    opt.step(loss_of(m))
    g = opt.last_step.projected_grad
    # the new group moved along its own direction with its own learning rate
    for n, p in m[2].named_parameters():
        z = materialize_direction(opt, p, step=2)
        torch.testing.assert_close(p.detach(), head_before[n] - 0.5 * g * z, rtol=1e-6, atol=1e-7)
    assert not torch.equal(m[0].weight, body_before["0.weight"])


def test_add_param_group_is_refused_while_a_trajectory_records(tmp_path):
    m = mlp()
    opt = ZOOptimizer(list(m[0].parameters()), lr=1e-2, model=m, trajectory_path=tmp_path / "t.zot")
    opt.step(loss_of(m))
    with pytest.raises(ValueError, match="a trajectory log records a fixed trainable set"):
        opt.add_param_group({"params": list(m[2].parameters())})


def test_a_tensor_frozen_mid_run_gets_no_update_while_frozen():
    m = mlp()
    opt = ZOOptimizer(m, lr=1e-2)
    opt.step(loss_of(m))
    m[2].weight.requires_grad_(False)
    frozen = m[2].weight.detach().clone()
    for _ in range(2):
        opt.step(loss_of(m))
    assert torch.equal(m[2].weight, frozen), "no gradient, no update, as with backprop"
    m[2].weight.requires_grad_(True)
    opt.step(loss_of(m))
    assert not torch.equal(m[2].weight, frozen)


# ----------------------------------------------------------------------------- reads outside a module
class DirectHead(nn.Module):
    """Reads ``head.weight`` without calling ``head`` (as TRL's fused LM head does)."""

    def __init__(self, tied: bool):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(10, 4)
        self.body = nn.Linear(4, 4)
        self.head = nn.Linear(4, 10, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, ids):
        h = torch.tanh(self.body(self.emb(ids)))
        return nn.functional.linear(h, self.head.weight).logsumexp(-1).mean()


@pytest.mark.parametrize("tied", [False, True])
def test_a_parameter_read_outside_its_module_is_seen_perturbed(tied):
    model = DirectHead(tied)
    ids = torch.arange(8)
    opt = ZOOptimizer(model, lr=0.0, eps=1e-2)
    est = opt.estimate(lambda: model(ids))
    head = next(s for s in opt.specs() if s.param is model.head.weight)
    assert opt.perturber.eager == {id(head.param)}, "the direct read was found and made eager"
    # L+ equals the loss with every weight moved to theta + eps z by hand
    ref = DirectHead(tied)
    with torch.no_grad():
        for p, q in zip(ref.parameters(), model.parameters()):
            p.add_(1e-2 * materialize_direction(opt, q, step=0))
        assert est.losses_plus[0] == pytest.approx(ref(ids).item(), rel=1e-6)
    est2 = opt.estimate(lambda: model(ids))  # later forwards: eager, no watching needed
    assert est2.projected_grads == est.projected_grads


def test_a_trainable_tensor_the_forward_never_uses_is_reported():
    model = DirectHead(False)
    unused = nn.Linear(2, 2)
    model.unused = unused
    opt = ZOOptimizer(model, lr=1e-3)
    with pytest.raises(RuntimeError, match=r"never reached \['unused.weight', 'unused.bias'\]"):
        opt.step(lambda: model(torch.arange(4)))


# ----------------------------------------------------------------------------- interrupts
def test_ctrl_c_during_an_update_pass_is_delivered_after_it(monkeypatch):
    from zo_plugins.core import passes

    m = mlp()
    ref = mlp()
    ZOOptimizer(ref, lr=1e-2).step(loss_of(ref))
    opt = ZOOptimizer(m, lr=1e-2)
    real = passes.update_
    calls = []

    def interrupted(spec, **kw):
        calls.append(spec.name)
        if len(calls) == 1:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C arrives after the first tensor's pass
        real(spec, **kw)

    monkeypatch.setattr("zo_plugins.core.backend.update_", interrupted)
    with pytest.raises(KeyboardInterrupt):
        opt.step(loss_of(m))
    assert len(calls) == 4, "every tensor was updated before the interrupt was delivered"
    assert_bit_identical(params_snapshot(ref), params_snapshot(m))


# ----------------------------------------------------------------------------- lr warning, grad norm
def test_a_backprop_sized_learning_rate_is_warned_about_in_the_first_steps(caplog):
    model = tiny_hf_model("llama")
    batch = tiny_batch("llama")
    start = sum(p.detach().double().square().sum().item() for p in model.parameters()) ** 0.5
    opt = ZOOptimizer(model, lr=0.1)  # Lightning's transformer example: SGD lr 0.1
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        for _ in range(2):  # measured: the loss goes 4.2 -> 7.0 by step 4 and 3e3 by step 8
            opt.step(lambda: model(**batch).loss)
    assert "ZO step 1 moves the trainable weights by" in caplog.text and "(lr=0.1," in caplog.text
    assert "MeZO uses 1e-7 to 1e-5" in caplog.text
    assert opt.last_step.update_norm > start  # what the warning says


def test_a_loss_that_grows_tenfold_is_warned_about(caplog):
    m = mlp()
    values = iter([1.0, 1.0, 2.0, 2.0, 50.0, 50.0])  # L+ = L-: no update, only the loss grows

    def closure():
        m(X)
        return torch.tensor(next(values))

    opt = ZOOptimizer(m, lr=1e-3)
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        for _ in range(2):
            opt.step(closure)
        assert "diverges" not in caplog.text  # 1 -> 2: not yet
        opt.step(closure)
    assert (
        "ZO step 2: the loss went from 1 to 50 since the first step: the run diverges (lr=0.001)"
        in caplog.text
    )


@pytest.mark.parametrize("lr,eps,trainable", [(1e-6, 1e-3, "full"), (1e-4, 1e-2, "lora")])
def test_mezo_sized_learning_rates_are_not_warned_about(caplog, lr, eps, trainable):
    model = tiny_hf_model("llama")
    if trainable == "lora":
        peft = pytest.importorskip("peft")
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = tiny_batch("llama")
    opt = ZOOptimizer(model, lr=lr, eps=eps)
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        for _ in range(3):
            opt.step(lambda: model(**batch).loss)
    assert "times their norm" not in caplog.text


def test_grad_norm_is_the_norm_of_the_gradient_estimate():
    m = mlp()
    opt = ZOOptimizer(m, lr=1e-2, distribution="rademacher")
    opt.step(loss_of(m))
    d = sum(p.numel() for p in m.parameters())
    assert opt.last_step.grad_norm == pytest.approx(
        abs(opt.last_step.projected_grad) * math.sqrt(d), rel=1e-12
    )
    z = torch.cat([materialize_direction(opt, p, step=0).reshape(-1) for p in m.parameters()])
    assert opt.last_step.grad_norm == pytest.approx(
        (opt.last_step.projected_grad * z).norm().item(), rel=1e-6
    )


# ----------------------------------------------------------------------------- ranking raw outputs
def test_a_ranking_oracle_ranks_raw_outputs_never_converted_to_numbers():
    m = mlp()
    before = params_snapshot(m)
    seen = []

    def closure():  # "generated text": a string whose length stands for its quality
        return "x" * (1 + int(1e4 * m(X).pow(2).mean().item()) % 7)

    def oracle(outputs):
        seen.append(list(outputs))
        return sorted(range(len(outputs)), key=lambda j: len(outputs[j]))

    opt = ZOOptimizer(m, lr=1e-2, estimator="rank", n_queries=3, ranking_oracle=oracle)
    opt.step(closure)
    assert seen and all(isinstance(o, str) for o in seen[0])
    assert any(not torch.equal(before[n], p) for n, p in m.named_parameters())


# ----------------------------------------------------------------------------- accelerate launch
def test_a_single_process_from_accelerate_launch_cpu_num_processes_2_is_reported(monkeypatch, caplog):
    monkeypatch.setattr(distributed, "_CHECKED_LAUNCH", False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "True")
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    argv = ["python", "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2", "train.py"]
    monkeypatch.setattr(distributed, "_parent_cmdline", lambda: argv)
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        ZOOptimizer(mlp(), lr=1e-3)
    assert "--num_processes 2 started ONE process" in caplog.text
    monkeypatch.setattr(distributed, "_CHECKED_LAUNCH", False)
    monkeypatch.setattr(distributed, "_parent_cmdline", lambda: argv[:-3] + ["--num_processes=1", "train.py"])
    assert distributed.check_launch() is None
