"""Trajectory logs: replay is bit-identical, tampering and truncation are detected, the log
is a few dozen bytes per step."""

import os

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot

from zo_plugins import TrajectoryError, ZOOptimizer, read_trajectory, replay


def make(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(30, 8, padding_idx=0), nn.Dropout(0.1), nn.Linear(8, 1)).to(dtype)


def train(model, log, steps=12, nan_at=(), **kw):
    ids = torch.randint(0, 30, (16, 5), generator=torch.Generator().manual_seed(1))
    opt = ZOOptimizer(model, lr=1e-2, weight_decay=0.1, trajectory_path=log, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.5)
    for i in range(steps):
        scale = float("nan") if i in nan_at else 1.0
        opt.step(lambda: model(ids).float().pow(2).mean() * scale)
        sched.step()
    opt.close()
    return opt


@pytest.mark.parametrize(
    "dtype,kw",
    [
        (torch.float32, {}),  # in place: replay repeats the perturbation passes' rounding
        (torch.float32, {"perturbation": "out-of-place", "n_queries": 2}),
        (torch.bfloat16, {"distribution": "rademacher"}),  # out of place + stochastic rounding
    ],
)
def test_replay_is_bit_identical(tmp_path, dtype, kw):
    log = tmp_path / "run.zot"
    trained = make(dtype)
    opt = train(trained, log, nan_at=(5,), **kw)
    assert opt.skipped_steps == 1
    base = make(dtype)
    assert any(not torch.equal(a, b) for a, b in zip(base.parameters(), trained.parameters()))
    replay(base, log)
    assert_bit_identical(params_snapshot(trained), params_snapshot(base))


def test_replay_of_a_prefix_and_log_size(tmp_path):
    log = tmp_path / "run.zot"
    trained = make()
    train(trained, log, steps=40)
    header, records = read_trajectory(log)
    assert len(records) == 40 and header["config"]["eps"] == 1e-3
    header_bytes = len(log.read_bytes().split(b"\n", 1)[0]) + 1
    per_step = (os.path.getsize(log) - header_bytes) / 40
    # 24 bytes for a plain step, 41 when lr/wd changed (here every 4th step)
    assert per_step == (30 * 24 + 10 * 41) / 40, per_step
    part = make()
    replay(part, log, steps=10)
    ref = make()
    train(ref, tmp_path / "ten.zot", steps=10)
    assert_bit_identical(params_snapshot(ref), params_snapshot(part))


def test_replay_refuses_other_base_weights_version_and_names(tmp_path, monkeypatch):
    log = tmp_path / "run.zot"
    train(make(), log)
    other = make()
    with torch.no_grad():
        other[2].bias.add_(1e-6)
    before = params_snapshot(other)
    with pytest.raises(TrajectoryError, match="starting weights"):
        replay(other, log)
    assert_bit_identical(before, params_snapshot(other))
    with pytest.raises(TrajectoryError, match="no parameter"):
        replay(nn.Sequential(nn.Linear(8, 1)), log)
    import zo_plugins

    monkeypatch.setattr(zo_plugins, "__version__", "9.9.9")
    with pytest.raises(TrajectoryError, match="allow_version_mismatch"):
        replay(make(), log)
    replay(make(), log, allow_version_mismatch=True)


@pytest.mark.parametrize("damage", ["truncate", "flip", "drop", "header"])
def test_tampered_or_truncated_logs_are_refused(tmp_path, damage):
    log = tmp_path / "run.zot"
    train(make(), log)
    data = bytearray(log.read_bytes())
    head_end = data.index(b"\n") + 1
    rec = 2 + 14 + 17 + 8  # the first record also carries lr/wd
    if damage == "truncate":
        data = data[:-5]
        match = "incomplete"
    elif damage == "flip":
        data[head_end + 10] ^= 0x01  # one bit of the first projected gradient
        match = "hash chain"
    elif damage == "drop":
        data = data[:head_end] + data[head_end + rec :]
        match = "hash chain"
    else:
        data = b'{"format": "something-else"}\n' + data[head_end:]
        match = "not a zo-trajectory"
    log.write_bytes(bytes(data))
    model = make()
    before = params_snapshot(model)
    with pytest.raises(TrajectoryError, match=match):
        replay(model, log)
    assert_bit_identical(before, params_snapshot(model))


def test_resumed_run_continues_the_log(tmp_path):
    log = tmp_path / "run.zot"
    ids = torch.randint(1, 30, (16, 5), generator=torch.Generator().manual_seed(1))
    full = make()
    opt = ZOOptimizer(full, lr=1e-2, trajectory_path=tmp_path / "full.zot")
    for _ in range(8):
        opt.step(lambda: full(ids).pow(2).mean())
    opt.close()

    a = make()
    opt = ZOOptimizer(a, lr=1e-2, trajectory_path=log)
    for i in range(6):
        opt.step(lambda: a(ids).pow(2).mean())
        if i == 3:  # a checkpoint: weights, optimizer and the RNG (dropout) state
            saved = (params_snapshot(a), opt.state_dict(), torch.get_rng_state())
    opt.close()  # "crashed" after step 5; the checkpoint is from step 3
    b = make()
    b.load_state_dict(saved[0])
    opt = ZOOptimizer(b, lr=1e-2, trajectory_path=log)
    opt.load_state_dict(saved[1])
    torch.set_rng_state(saved[2])
    for _ in range(4):
        opt.step(lambda: b(ids).pow(2).mean())
    opt.close()
    assert_bit_identical(params_snapshot(full), params_snapshot(b))
    _, records = read_trajectory(log)
    assert [r["step"] for r in records] == list(range(8))
    base = make()
    replay(base, log)
    assert_bit_identical(params_snapshot(full), params_snapshot(base))
