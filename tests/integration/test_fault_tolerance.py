"""A process killed with SIGKILL mid-run resumes to the same final weights as an
uninterrupted run; an interrupted checkpoint write is never loaded; the trajectory log
written across the crash replays to the final weights."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

JOB = Path(__file__).with_name("fault_job.py")


def run(mode: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, str(JOB), mode, str(out), *extra],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize("mode", ["hf", "plain"])
def test_kill_9_then_resume_equals_uninterrupted(tmp_path, mode):
    ref = run(mode, tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = run(mode, tmp_path / "crash", "--kill-at", "5")
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "crash" / "final.safetensors").exists()

    # a checkpoint whose write was interrupted (the step-6 save never finished)
    if mode == "hf":
        torn = tmp_path / "crash" / "run" / "checkpoint-6"
        shutil.copytree(tmp_path / "crash" / "run" / "checkpoint-4", torn)
        (torn / "trainer_state.json").write_text('{"global_step": 6, "log_hist')  # cut mid-write
    else:
        torn = tmp_path / "crash" / "ckpt" / ".checkpoint-6.tmp-123"
        shutil.copytree(tmp_path / "crash" / "ckpt" / "checkpoint-4", torn)

    resumed = run(mode, tmp_path / "crash", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = load_file(tmp_path / "ref" / "final.safetensors")
    b = load_file(tmp_path / "crash" / "final.safetensors")
    assert a.keys() == b.keys()
    bad = [n for n in a if not torch.equal(bits(a[n]), bits(b[n]))]
    assert not bad, f"resumed weights differ from the uninterrupted run: {bad[:3]}"
    if mode == "hf":
        assert (tmp_path / "crash" / "run" / "incomplete-checkpoint-6").is_dir()

    # the log spans the crash (steps 5 and the lost step were dropped and redone)
    replayed = tmp_path / "replayed"
    cli = subprocess.run(
        [
            sys.executable,
            "-m",
            "zo_plugins.cli.replay",
            str(tmp_path / "crash" / "base"),
            str(tmp_path / "crash" / "traj.zot"),
            str(replayed),
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1"),
        timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    c = load_file(replayed / "model.safetensors")
    bad = [n for n in c if not torch.equal(bits(c[n]), bits(b[n]))]
    assert not bad, f"replayed weights differ: {bad[:3]}"
