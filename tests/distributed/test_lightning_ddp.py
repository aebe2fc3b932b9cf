"""ZODDPStrategy (and ZOLightningCallback on the stock DDPStrategy) in two real CPU processes
(gloo, launched by torchrun): one all-reduce of (n_queries + 1) float64 values per optimizer
step, DDP's buckets idle, both ranks' weights bit-identical after N steps."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from test_multiprocess import free_port, launch

pytest.importorskip("lightning")

JOB = Path(__file__).with_name("lightning_job.py")
STEPS = 4
pytestmark = pytest.mark.distributed


@pytest.mark.parametrize("mode", ["strategy", "callback"])
def test_lightning_ddp_two_processes(tmp_path, mode):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(JOB),
        mode,
        str(tmp_path),
    ]
    a, b = launch(cmd, tmp_path)
    assert a["world"] == b["world"] == 2
    assert a["global_step"] == b["global_step"] == STEPS
    for name in a["params"]:
        assert torch.equal(a["params"][name].view(torch.uint8), b["params"][name].view(torch.uint8)), name
    for r in (a, b):
        assert r["grads"] == [], "no parameter .grad may be allocated"
        assert r["ddp_bucket_all_reduces"] == 0, "DDP gradient buckets must stay idle"
        assert r["scalar_all_reduces"] == STEPS, "one all-reduce per optimizer step"
        assert r["scalar_numel"] == STEPS * 2  # n_queries + the skip flag
        assert {"projected_grad", "loss_plus", "loss_minus", "train_loss"} <= set(r["logged"])
    # each rank saw its own shard, so the all-reduce had something to average
    assert a["local_grads"] != b["local_grads"]
    from zo_testing import tiny_hf_model

    init = dict(tiny_hf_model("opt", dropout=0.1).named_parameters())
    assert any(not torch.equal(init[n].detach(), p) for n, p in a["params"].items())
