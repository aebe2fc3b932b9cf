"""What replay checks: the run's mask_fn is needed and recorded by name, a finished log's end
record holds the final weights' hash and a replay that does not reach it is refused, a cut
log replays what it holds with a warning, and streams -- not library versions -- decide
whether a log can be replayed."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn
from zo_testing import assert_bit_identical, params_snapshot

from zo_plugins import TrajectoryError, ZOOptimizer, read_log, replay


def make():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


X = torch.randn(16, 6, generator=torch.Generator().manual_seed(1))


def keep_left_half(name, param, step):
    if name != "0.weight":
        return None
    m = torch.zeros_like(param, dtype=torch.bool)
    m[:, :3] = True
    return m


def run(path, steps=4, finish=True, **kw):
    m = make()
    opt = ZOOptimizer(m, lr=1e-2, trajectory_path=path, **kw)
    for _ in range(steps):
        opt.step(lambda: m(X).pow(2).mean())
    opt.close(finished=finish)
    return m


def test_a_finished_log_replays_to_its_recorded_final_hash(tmp_path):
    trained = run(tmp_path / "t.zot")
    log = read_log(tmp_path / "t.zot")
    assert log.complete and log.end["steps"] == 4
    assert_bit_identical(params_snapshot(trained), params_snapshot(replay(make(), tmp_path / "t.zot")))


def test_a_replay_that_misses_the_final_weights_is_refused(tmp_path, monkeypatch):
    run(tmp_path / "t.zot")
    from zo_plugins.core import backend

    real = backend.update_

    def other_device(spec, **kw):  # a device whose update rounds differently
        real(spec, **kw)
        spec.param.data.view(-1)[:1] += 1e-6

    monkeypatch.setattr(backend, "update_", other_device)
    with pytest.raises(TrajectoryError, match="did not reproduce the run's final weights"):
        replay(make(), tmp_path / "t.zot")


def test_a_cut_log_replays_what_it_holds_with_a_warning(tmp_path, caplog):
    trained_two = run(tmp_path / "two.zot", steps=2)
    run(tmp_path / "t.zot", steps=4, finish=False)  # a run that stopped without its end record
    data = (tmp_path / "t.zot").read_bytes()
    head = data.index(b"\n") + 1 + 8  # the header line and its tag
    (tmp_path / "head.zot").write_bytes(data[:head])
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        out = replay(make(), tmp_path / "head.zot")
    assert "has no end record" in caplog.text and "Replayed the 0 step(s)" in caplog.text
    assert_bit_identical(params_snapshot(make()), params_snapshot(out))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        out = replay(make(), tmp_path / "t.zot", steps=2)
    assert "Replayed the 2 step(s)" in caplog.text
    assert_bit_identical(params_snapshot(trained_two), params_snapshot(out))


def test_a_run_with_mask_fn_needs_the_same_function_to_replay(tmp_path):
    trained = run(tmp_path / "t.zot", mask_fn=keep_left_half)
    header = read_log(tmp_path / "t.zot").header
    assert header["mask_fn"].endswith("keep_left_half")
    with pytest.raises(
        TrajectoryError, match=r"trained with mask_fn=.*keep_left_half: pass the same function"
    ):
        replay(make(), tmp_path / "t.zot")
    out = replay(make(), tmp_path / "t.zot", mask_fn=keep_left_half)
    assert_bit_identical(params_snapshot(trained), params_snapshot(out))
    run(tmp_path / "plain.zot")
    with pytest.raises(TrajectoryError, match="trained without a mask_fn"):
        replay(make(), tmp_path / "plain.zot", mask_fn=keep_left_half)


def test_another_library_version_replays_another_stream_version_does_not(tmp_path):
    path = tmp_path / "t.zot"
    trained = run(path)
    data = path.read_bytes()
    nl = data.index(b"\n")

    def rewrite(**changes):
        """The same run under an edited header: the header is in the hash chain, so the
        records are re-written (and re-chained) through the writer."""
        from zo_plugins.core.trajectory import TrajectoryWriter

        header = json.loads(data[:nl])
        header.update(changes)
        log = read_log(path)
        out = tmp_path / "edited.zot"
        w = TrajectoryWriter(out, header, 0)
        for rec in log.records:
            w.append(rec)
        w.finish(log.end["final_hash"])
        return out

    edited = rewrite(library_version="9.9.9")
    assert_bit_identical(params_snapshot(trained), params_snapshot(replay(make(), edited)))
    with pytest.raises(ValueError, match="stream_version"):
        rewrite(stream_version=1)  # the writer stamps this library's stream version itself
