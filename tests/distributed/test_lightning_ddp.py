"""ZODDPStrategy (and ZOLightningCallback on the stock DDPStrategy) in two real CPU processes
(gloo, launched by torchrun): one all-reduce of (n_queries + 1) float64 values per optimizer
step, DDP's buckets idle, both ranks' weights bit-identical after N steps."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_multiprocess import check, launch, torchrun_cmd

pytest.importorskip("lightning")

JOB = Path(__file__).with_name("lightning_job.py")
STEPS = 4
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("mode", ["strategy", "callback"])
def test_lightning_ddp_two_processes(tmp_path, mode):
    a, b = launch(torchrun_cmd(mode, tmp_path, job=JOB), tmp_path)
    check([a, b], steps=STEPS)
    assert a["global_step"] == b["global_step"] == STEPS
    for r in (a, b):
        assert {"projected_grad", "loss_plus", "loss_minus", "train_loss"} <= set(r["logged"])
    # each rank saw its own shard, so the all-reduce had something to average
    assert a["local_grads"] != b["local_grads"]
    from zo_testing import tiny_hf_model

    init = dict(tiny_hf_model("opt", dropout=0.1).named_parameters())
    assert any(not torch.equal(init[n].detach(), p) for n, p in a["params"].items())
