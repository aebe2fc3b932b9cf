"""The compile tier: every kernel variant of the CI grid compiled for sm_80 and sm_90 on this
CPU-only machine (``python -m zo_plugins.kernels.compile_report``), and what the PTX and SASS
must say.

The compiler runs in a subprocess without ``TRITON_INTERPRET``: ``tests/kernels/conftest.py``
sets that variable for the whole pytest process (the interpreter tests need it before Triton
decorates a kernel), and interpreted kernels have nothing to compile.  The report is produced
once per session (~1.5 minutes on 2 cores, two compile jobs, a fresh Triton cache) and skipped
with the reason when triton or its bundled ptxas / cuobjdump is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def compile_report(tmp_path_factory):
    pytest.importorskip("triton", reason="triton is not installed: pip install 'zo-plugins[triton]'")
    out = tmp_path_factory.mktemp("compile") / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_CACHE_DIR")}
    proc = subprocess.run(
        [sys.executable, "-m", "zo_plugins.kernels.compile_report", "--jobs", "2", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    report = json.loads(out.read_text()) if out.exists() else {}
    if proc.returncode == 2 and "skipped" in report:
        pytest.skip(f"cannot compile for a GPU here: {report['skipped']}")
    if not report.get("variants"):
        raise AssertionError(
            f"compile_report failed (rc {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    report["stdout"] = proc.stdout
    return report
