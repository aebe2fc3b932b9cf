"""Perturbation parallelism (``ZOConfig(perturbation_parallel=True)``) through the real launchers
on CPU (gloo): identical weights on every rank, the applied projected gradient equal to the
single-process one on the same data (4 processes: 2 pairs x 2 data shards, plain torchrun; 2
processes: the HF ZOTrainer under accelerate launch against a one-process run, Lightning's
ZODDPStrategy against ZOStrategy), one all-reduce of ``world * n_queries + world + 1`` values per
step, and a pair whose RNG drifted stopping before the update."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_multiprocess import accelerate_cmd, launch, torchrun_cmd

JOB = Path(__file__).with_name("pairs_job.py")
STEPS = 3
pytestmark = pytest.mark.distributed


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


def test_four_processes_two_pairs_match_single_process_gradients(tmp_path):
    ranks = launch(torchrun_cmd("plain", tmp_path, job=JOB, nproc=4), tmp_path, world=4)
    configs = [k for k in ranks[0] if k not in ("rng-mismatch", "nan-skip")]
    assert len(configs) == 4
    for name in configs:
        rs = [r[name] for r in ranks]
        assert all(_same(rs[0]["params"], r["params"]) for r in rs), f"{name}: ranks must agree bit for bit"
        # the mean over the two pairs of the single-process estimates on their batches, bit for bit
        assert rs[0]["applied"] == rs[0]["expected"], name
        assert all(r["applied"] == rs[0]["applied"] for r in rs)
        # data per pair: ranks 2p and 2p+1 read the same batches, the two pairs different ones
        assert rs[0]["seen"] == rs[1]["seen"] and rs[2]["seen"] == rs[3]["seen"] != rs[0]["seen"]
        n = rs[0]["n_queries"]
        assert rs[0]["all_reduces"] == STEPS and rs[0]["numel"] == STEPS * (4 * n + 4 + 1)
    assert ranks[0]["in-place-tensors"]["mode"] == "in-place"
    for r in ranks:
        err = r["rng-mismatch"]["error"]
        assert err and "ranks 0 and 1 (pair 0)" in err and "different RNG states" in err
        assert r["rng-mismatch"]["unchanged"], "the step that stopped must leave the weights untouched"
        # rank 3's NaN loss skips the step on all four ranks
        assert r["nan-skip"] == {"skipped": True, "skipped_steps": 1, "unchanged": True}


def test_hf_zo_trainer_pairs_under_accelerate_equal_one_process(tmp_path):
    pytest.importorskip("transformers")
    pairs, single = tmp_path / "pairs", tmp_path / "single"
    pairs.mkdir()
    single.mkdir()
    cmd = accelerate_cmd(JOB, "hf", pairs)
    a, b = launch(cmd, pairs)
    ref = launch([sys.executable, str(JOB), "hf-ref", str(single)], single, world=1)[0]
    assert ref["world"] == 1 and a["world"] == b["world"] == 2
    assert _same(a["params"], ref["params"]) and _same(b["params"], ref["params"])
    # the Trainer's logged loss is the ranks' mean, (L+ + L-) / 2: the one-process value
    assert a["history"] == ref["history"]
    assert a["all_reduces"] == STEPS and a["steps"] == STEPS


def test_lightning_zo_ddp_pairs_equal_one_process(two_rank_run):
    pytest.importorskip("lightning")
    a, b = (r["pairs-lightning"] for r in two_rank_run)
    for r in (a, b):
        p, s = r["pairs"], r["single"]
        assert p["global_step"] == s["global_step"] == STEPS
        assert p["all_reduces"] == STEPS
        # one forward per micro-batch on each rank of the pair, two on the single process
        assert p["seen"] == s["seen"][::2] == s["seen"][1::2]
        # gradient accumulation (2 micro-batches): the pair subtracts factor-weighted sums of
        # losses; equal to the single-process accumulation to float64 rounding of those sums
        for gp, gs in zip(p["grads"], s["grads"]):
            assert gp == pytest.approx(gs, rel=1e-9, abs=1e-12)
        for n in p["params"]:
            torch.testing.assert_close(p["params"][n], s["params"][n], rtol=0, atol=1e-7)
    assert a["pairs"]["seen"] == b["pairs"]["seen"]
    assert _same(a["pairs"]["params"], b["pairs"]["params"]), "both ranks of the pair must agree bit for bit"
