"""Real multi-process runs on CPU (gloo): every rank ends with bit-identical weights, one
small all-reduce per optimizer step, DDP's gradient buckets never fire."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from zo_testing import free_port, torchrun_cmd_for

JOB = Path(__file__).with_name("ddp_job.py")
STEPS = 4
pytestmark = pytest.mark.distributed


def launch(cmd: list[str], out: Path, world: int = 2) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"launcher failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(world)]


def check(ranks: list[dict], steps: int = STEPS, grads_per_step: int = 1) -> None:
    """Both ranks bit-identical, no .grad, DDP buckets idle, one ZO all-reduce per step."""
    a, b = ranks
    assert a["world"] == b["world"] == 2
    for name in a["params"]:
        assert torch.equal(a["params"][name].view(torch.uint8), b["params"][name].view(torch.uint8)), name
    for r in ranks:
        assert r["grads"] == [], "no parameter .grad may be allocated"
        assert r["ddp_bucket_all_reduces"] == 0, "DDP gradient buckets must stay idle"
        # one all-reduce of (projected gradients per step + 1) float64 values per optimizer step
        assert r["scalar_all_reduces"] == steps
        assert r["scalar_numel"] == steps * (grads_per_step + 1)


def accelerate_cmd(job: Path, *args: object) -> list[str]:
    """``accelerate launch --multi_gpu`` of ``job`` with two processes (gloo on CPU)."""
    return [
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
        str(job),
        *map(str, args),
    ]


def torchrun_cmd(mode: str, out: Path, job: Path = JOB, zo: str | None = None, nproc: int = 2) -> list[str]:
    return torchrun_cmd_for(job, mode, out, *([zo] if zo else []), nproc=nproc)


@pytest.mark.parametrize("mode", ["hf", "plain"])
def test_torchrun_two_processes(tmp_path, mode):
    ranks = launch(torchrun_cmd(mode, tmp_path), tmp_path)
    check(ranks)
    # and the weights did move
    from zo_testing import tiny_hf_model

    init = dict(tiny_hf_model("opt", dropout=0.1).named_parameters())
    assert any(not torch.equal(init[n].detach(), p) for n, p in ranks[0]["params"].items())


def test_accelerate_launch_two_processes(tmp_path):
    check(launch(accelerate_cmd(JOB, "hf", tmp_path), tmp_path))


def test_every_estimator_and_stateful_rule_runs_on_two_processes(tmp_path):
    """cge (whose collective is cge_coordinates long), rank and several queries, the forward
    difference, forward-grad, Adam, the conservative rule, FZOO and HiZOO (gradients and
    curvatures: 2 values a direction), the one-visit schedule and disk offload under DDP: ranks
    bit-identical and the applied projected gradient is the mean of the two ranks' own
    estimates (FZOO: that mean, normalised by its spread, i.e. the global batch's losses
    normalised); the one-visit and offloaded runs equal the per-forward one."""
    a, b = launch(torchrun_cmd("methods", tmp_path), tmp_path)
    assert a.keys() == b.keys() and len(a) == 12
    for name in a:
        ra, rb = a[name], b[name]
        if name == "conservative":  # and one all-reduce of (probe loss, baseline) per step
            for r in (ra, rb):
                assert r["scalar_all_reduces"] == 2 * STEPS and r["scalar_numel"] == STEPS * (2 + 2)
                r["scalar_all_reduces"], r["scalar_numel"] = STEPS, 2 * STEPS
                r["local_grads"] = r["local_grads"][::2]
        check([ra, rb], grads_per_step=ra["grads_per_step"])
        assert ra["grads_per_step"] == {
            "spsa-3": 3,
            "forward-2": 2,
            "cge": 5,
            "rank-3": 3,
            "fzoo-3": 3,
            "hizoo": 2,
        }.get(name, 1)
        la, lb = ra["local_grads"][-1], rb["local_grads"][-1]  # last step's local values (+ skip flag)
        assert la != lb, f"{name}: each rank estimated on its own shard"
        assert ra["rejected_steps"] == rb["rejected_steps"], "ranks must take the same accept/reject decision"
        if name == "conservative":
            assert 0 < ra["rejected_steps"], "some steps must be rejected for the decision to be tested"
        if name != "conservative":
            expected = [(x + y) / 2 for x, y in zip(la[:-1], lb[:-1])]
            if name == "fzoo-3":
                mean = sum(expected) / 3
                sd = (sum((v - mean) ** 2 for v in expected) / 3) ** 0.5
                expected = [v / sd for v in expected]
                assert ra["projected_grads"] == pytest.approx(expected, rel=1e-12)
                assert ra["projected_grads"] == rb["projected_grads"]
                continue
            assert ra["projected_grads"] == rb["projected_grads"] == expected, name
    for name in ("one-visit", "offload-disk"):  # bit for bit the per-forward run, on every rank
        for r in (a, b):
            assert r[name]["projected_grads"] == r["spsa-1"]["projected_grads"], name
            for n, p in r["spsa-1"]["params"].items():
                assert torch.equal(r[name]["params"][n].view(torch.uint8), p.view(torch.uint8)), (name, n)


def test_hf_trainer_ranks_agree_with_rank_estimator_and_three_queries(tmp_path):
    ranks = launch(torchrun_cmd("hf", tmp_path, zo='{"estimator": "rank", "n_queries": 3}'), tmp_path)
    check(ranks, grads_per_step=3)


def test_quantized_scales_on_two_processes(tmp_path):
    """DDP over a quantized model (bitsandbytes NF4, torchao int8), ZO training its scales:
    ranks end bit-identical (scales and codes), one scalar all-reduce per step, and the scales
    moved while the codes did not."""
    from zo_testing import quant_available, tiny_quantized_llama

    from zo_plugins.quant import frozen_codes, scales_state_dict

    a, b = launch(torchrun_cmd("quantized", tmp_path), tmp_path)
    expected = [bk for bk in ("bnb-nf4", "torchao-int8") if quant_available(bk)]
    if not expected:
        pytest.skip("neither bitsandbytes nor torchao is installed")
    assert sorted(a) == sorted(b) == sorted(expected)
    for backend in expected:
        check([a[backend], b[backend]])
        base = tiny_quantized_llama(backend)
        scales, codes = scales_state_dict(base), frozen_codes(base)
        got = a[backend]["params"]
        assert all(not torch.equal(got[n], v) for n, v in scales.items()), backend
        assert all(torch.equal(got[n], v) for n, v in codes.items()), backend
