"""The GPU scripts keep working where they can run here: ``scripts/gpu_check.py --tiny`` and
``benchmarks/kernels.py --cpu-smoke`` under the interpreter (this folder's conftest sets
``TRITON_INTERPRET=1``, which the subprocesses inherit).  On a GPU they are run by hand."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernel_helpers import triton_or_skip

triton_or_skip()
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TRITON_INTERPRET="1")
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )


def test_gpu_check_runs_its_cpu_parts_and_they_pass():
    proc = _run("scripts/gpu_check.py", "--tiny")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(("PASS", "FAIL", "SKIP"))]
    passed = [ln for ln in lines if ln.startswith("PASS")]
    assert len(passed) >= 7 and not [ln for ln in lines if ln.startswith("FAIL")], "\n".join(lines)
    for needs_gpu in ("above 2**31", "second GPU", "host sync"):
        assert any(ln.startswith("SKIP") and needs_gpu in ln for ln in lines), needs_gpu


def test_kernel_benchmark_smoke_checks_correctness_before_timing():
    proc = _run("benchmarks/kernels.py", "--cpu-smoke")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    out = proc.stdout
    assert "all passes agree" in out and out.index("all passes agree") < out.index("passes (bytes")
    assert "ZOOptimizer out-of-place triton" in out
