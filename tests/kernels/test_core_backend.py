"""ZOOptimizer on the Triton backend (CPU interpreter): the same weights as the PyTorch
backend for Rademacher runs, exact restore, and trajectory replay on the backend that trained."""

import pytest
import torch
from torch import nn

from zo_plugins import ZOOptimizer, replay

pytest.importorskip("triton", reason="the Triton backend needs triton: pip install 'zo-plugins[triton]'")


def params_snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(a, b):
    bad = [
        n
        for n in a
        if not torch.equal(a[n].reshape(-1).view(torch.uint8), b[n].reshape(-1).view(torch.uint8))
    ]
    assert not bad, f"{len(bad)} tensors differ bitwise: {bad[:3]}"


def make(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(17, 8, padding_idx=0), nn.Linear(8, 3)).to(dtype)


IDS = torch.randint(0, 17, (4, 5), generator=torch.Generator().manual_seed(1))


def run(backend, dtype=torch.float32, steps=3, **kw):
    model = make(dtype)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2, weight_decay=0.1, backend=backend, **kw)
    assert opt.backend == backend
    for _ in range(steps):
        opt.step(lambda: model(IDS).float().pow(2).mean())
    opt.close()
    return model


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, {"perturbation": "in-place"}),
        (torch.float32, {"perturbation": "out-of-place"}),
        (torch.bfloat16, {"stochastic_rounding": False}),
    ],
)
def test_triton_and_torch_backends_give_the_same_bits_for_rademacher(dtype, kw):
    a = run("triton", dtype, distribution="rademacher", **kw)
    b = run("torch", dtype, distribution="rademacher", **kw)
    assert_bit_identical(params_snapshot(a), params_snapshot(b))
    assert not torch.equal(a[1].weight, make(dtype)[1].weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_triton_lr_zero_out_of_place_is_exact(dtype):
    model = make(dtype)
    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=0.0, backend="triton", perturbation="out-of-place")
    opt.step(lambda: model(IDS).float().pow(2).mean())
    assert_bit_identical(before, params_snapshot(model))


def test_triton_gaussian_run_replays_on_triton(tmp_path):
    log = tmp_path / "t.zot"
    trained = run("triton", trajectory_path=str(log))
    replayed = replay(make(), log)
    assert_bit_identical(params_snapshot(trained), params_snapshot(replayed))


def test_triton_refuses_float64():
    with pytest.raises(ValueError, match="float64"):
        ZOOptimizer(make(torch.float64), lr=1e-3, backend="triton")


@pytest.mark.parametrize("optimizer", ["zo-sgd-sign", "zo-sgd-momentum", "zo-adam"])
def test_stateful_rules_on_triton_match_the_torch_backend(optimizer):
    # sign and momentum bit for bit; Adam within an ulp of its step (PyTorch's vectorised CPU
    # sqrt is not correctly rounded, the kernel's is)
    a = run("triton", distribution="rademacher", optimizer=optimizer, perturbation="in-place")
    b = run("torch", distribution="rademacher", optimizer=optimizer, perturbation="in-place")
    if optimizer == "zo-adam":
        for (n, x), y in zip(params_snapshot(a).items(), params_snapshot(b).values()):
            assert torch.allclose(x, y, rtol=2**-22, atol=1e-2 * 2**-22), n
    else:
        assert_bit_identical(params_snapshot(a), params_snapshot(b))
    assert not torch.equal(a[1].weight, make()[1].weight)


def test_gaussian_runs_agree_across_backends_on_the_philox_stream():
    a = run("triton", perturbation="in-place", gaussian_stream="philox")
    b = run("torch", perturbation="in-place", gaussian_stream="philox")
    start = params_snapshot(make())
    for (n, x), y in zip(params_snapshot(a).items(), params_snapshot(b).values()):
        # directions agree to <= 8 float32 ulps; three steps of lr 1e-2 * g * z on weights ~0.3
        assert torch.allclose(x, y, rtol=1e-6, atol=1e-6), (n, (x - y).abs().max())
        assert (x != start[n]).float().mean() > 0.9, n  # both moved (padding row aside)


def test_triton_backend_refuses_the_native_gaussian_stream():
    with pytest.raises(ValueError, match="gaussian_stream='native'"):
        ZOOptimizer(make(), lr=1e-3, backend="triton", gaussian_stream="native")


def test_stateful_rule_state_stays_float32_through_a_checkpoint_for_bf16_weights():
    model = make(torch.bfloat16)
    opt = ZOOptimizer(model, lr=1e-2, backend="triton", optimizer="zo-adam", distribution="rademacher")
    opt.step(lambda: model(IDS).float().pow(2).mean())
    sd = opt.state_dict()
    model2 = make(torch.bfloat16)
    model2.load_state_dict(model.state_dict())
    opt2 = ZOOptimizer(model2, lr=1e-2, backend="triton", optimizer="zo-adam", distribution="rademacher")
    opt2.load_state_dict(sd)
    for st in opt2.state.values():
        assert st["exp_avg"].dtype == torch.float32 and st["exp_avg_sq"].dtype == torch.float32
    opt.step(lambda: model(IDS).float().pow(2).mean())
    opt2.step(lambda: model2(IDS).float().pow(2).mean())
    assert_bit_identical(params_snapshot(model), params_snapshot(model2))


@pytest.mark.parametrize("optimizer", ["zo-sgd", "zo-sgd-momentum"])
def test_sparse_mezo_magnitude_mask_runs_in_the_kernels_and_matches_torch(optimizer, monkeypatch):
    from zo_plugins.core import backend

    # the kernels (not the PyTorch passes) must run: fail if the optimizer falls back
    monkeypatch.setattr(backend, "TORCH_PASSES", None)
    a = run("triton", distribution="rademacher", optimizer=optimizer, sparsity=0.6, sparsity_mode="magnitude")
    monkeypatch.undo()
    b = run("torch", distribution="rademacher", optimizer=optimizer, sparsity=0.6, sparsity_mode="magnitude")
    assert_bit_identical(params_snapshot(a), params_snapshot(b))
    start = make()[1].weight
    changed = (a[1].weight != start).float().mean().item()
    assert 0.25 < changed < 0.55, changed  # ~40% perturbed/updated per step, masks move a little


def test_user_mask_is_respected_on_the_triton_backend():
    model = make()
    before = params_snapshot(model)
    keep = torch.zeros(3, 8, dtype=torch.bool)
    keep[:, :4] = True
    opt = ZOOptimizer(
        model,
        lr=1e-1,
        backend="triton",
        distribution="rademacher",
        mask_fn=lambda name, p, step: keep if name == "1.weight" else None,
    )
    for _ in range(2):
        opt.step(lambda: model(IDS).float().pow(2).mean())
    w = model[1].weight
    assert torch.equal(w[:, 4:], before["1.weight"][:, 4:])
    assert (w[:, :4] != before["1.weight"][:, :4]).all()


def test_a_gaussian_triton_log_is_refused_up_front_where_its_kernels_round_differently(tmp_path, monkeypatch):
    from zo_plugins import TrajectoryError, replay

    model = make()
    base = params_snapshot(model)
    opt = ZOOptimizer(
        model, lr=1e-2, backend="triton", gaussian_stream="philox", trajectory_path=tmp_path / "g.zot"
    )
    opt.step(lambda: model(IDS).float().pow(2).mean())
    opt.close()
    fresh = make()
    assert_bit_identical(base, params_snapshot(fresh))
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # as if on a GPU: compiled kernels, libdevice math
    with pytest.raises(
        TrajectoryError, match="Gaussian run of the Triton kernels under the Triton interpreter"
    ):
        replay(fresh, tmp_path / "g.zot")
