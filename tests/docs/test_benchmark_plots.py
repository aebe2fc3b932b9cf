"""The benchmark figures are drawn from the committed JSON alone (benchmarks/plots.py), and
every figure a docs page embeds exists."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.mark.parametrize("kind,name", [("step-cost", "step_cost-vm"), ("offload", "offload-vm")])
def test_plots_draw_from_the_json(kind, name, tmp_path):
    pytest.importorskip("matplotlib")
    import plots

    out = tmp_path / f"{name}.png"
    plots.main([kind, str(ROOT / "benchmarks" / "results" / f"{name}.json"), "--png", str(out)])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_every_embedded_figure_exists_and_its_page_names_the_command():
    for page in (ROOT / "docs").glob("*.md"):
        text = page.read_text()
        for m in re.finditer(r"!\[[^\]]*\]\((img/[^)]+)\)", text):
            assert (ROOT / "docs" / m.group(1)).is_file(), f"{page.name}: {m.group(1)} is missing"
            assert "python benchmarks/" in text, f"{page.name} embeds {m.group(1)} but names no command"


def test_convergence_reports_and_figures_carry_machine_date_and_command(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import json
    import subprocess

    runs = ROOT / "benchmarks" / "results" / "convergence-lora-top2-cached-issue14-seed0.runs.json"
    cmd = [sys.executable, "benchmarks/convergence.py", "--merge-runs", str(runs), "--merged-name", "t"]
    cmd += ["--output", str(tmp_path), "--plot-dir", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "convergence-t.json").read_text())
    assert report["command"].startswith("python benchmarks/convergence.py --merge-runs")
    assert "-core" in report["machine"] and "torch" in report["machine"] and report["date"][:2] == "20"
    assert (tmp_path / "convergence-t-goal.png").stat().st_size > 10_000
    import convergence

    note = convergence.caption(
        {"command": "python benchmarks/convergence.py --x", "machine": "M", "date": "D"}
    )
    assert note == "python benchmarks/convergence.py --x -- M, D"


def test_convergence_merge_drops_named_cells_and_refuses_unknown_ones(tmp_path):
    import json
    import subprocess

    res = ROOT / "benchmarks" / "results"
    files = [str(res / f"convergence-lora-top2-cached-issue14-seed{s}.runs.json") for s in (0, 1)]
    base = [sys.executable, "benchmarks/convergence.py", "--merge-runs", *files, "--merged-name", "t"]
    base += ["--output", str(tmp_path), "--plot-dir", str(tmp_path)]
    keep = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert keep.returncode == 0, keep.stderr[-3000:]
    both = json.loads((tmp_path / "convergence-t.json").read_text())["sweep_results"]["mezo@1"]
    drop = "convergence-lora-top2-cached-issue14-seed1.runs.json:mezo@1:1"
    proc = subprocess.run(base + ["--drop", drop], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "convergence-t.json").read_text())["sweep_results"]["mezo@1"]
    assert both["seed_list"] == [0, 1] and one["seed_list"] == [0]
    bad = subprocess.run(base + ["--drop", "x.runs.json:mezo@1:1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "no file holds" in bad.stderr
