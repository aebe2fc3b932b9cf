"""Real multi-process runs on CPU (gloo): every rank ends with bit-identical weights, one
small all-reduce per optimizer step, DDP's gradient buckets never fire."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

JOB = Path(__file__).with_name("ddp_job.py")
STEPS = 4
pytestmark = pytest.mark.distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cmd: list[str], out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launcher failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]


def check(ranks: list[dict], steps: int = STEPS) -> None:
    """Both ranks bit-identical, no .grad, DDP buckets idle, one ZO all-reduce per step."""
    a, b = ranks
    assert a["world"] == b["world"] == 2
    for name in a["params"]:
        assert torch.equal(a["params"][name].view(torch.uint8), b["params"][name].view(torch.uint8)), name
    for r in ranks:
        assert r["grads"] == [], "no parameter .grad may be allocated"
        assert r["ddp_bucket_all_reduces"] == 0, "DDP gradient buckets must stay idle"
        # one all-reduce of (n_queries + 1) float64 values per optimizer step
        assert r["scalar_all_reduces"] == steps
        assert r["scalar_numel"] == steps * 2


def torchrun_cmd(mode: str, out: Path, job: Path = JOB) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(free_port()),
        str(job),
        mode,
        str(out),
    ]


@pytest.mark.parametrize("mode", ["hf", "plain"])
def test_torchrun_two_processes(tmp_path, mode):
    ranks = launch(torchrun_cmd(mode, tmp_path), tmp_path)
    check(ranks)
    # and the weights did move
    from zo_testing import tiny_hf_model

    init = dict(tiny_hf_model("opt", dropout=0.1).named_parameters())
    assert any(not torch.equal(init[n].detach(), p) for n, p in ranks[0]["params"].items())


def test_accelerate_launch_two_processes(tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(JOB),
        "hf",
        str(tmp_path),
    ]
    check(launch(cmd, tmp_path))
