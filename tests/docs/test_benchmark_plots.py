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

    runs = ROOT / "benchmarks" / "results" / "convergence-lora-top2-cached-issue14-quiet.runs.json"
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
    # a JSON written before commands were recorded: the command rebuilt from its settings
    old = {
        "cached": True,
        "trainable": "lora",
        "top_blocks": 2,
        "budget": 300,
        "lr": 0.02,
        "seeds": [0, 1, 2],
        "machine": "M",
        "date": "D",
    }
    assert convergence.caption(old) == (
        "python benchmarks/convergence.py --cached --trainable lora --top-blocks 2 --budget 300 "
        "--lr 0.02 --seeds 0 1 2 -- M, D"
    )


def test_convergence_merge_drops_named_cells_and_refuses_unknown_ones(tmp_path):
    import json
    import subprocess

    res = ROOT / "benchmarks" / "results"
    files = [str(res / "convergence-lora-top2-cached-issue14-quiet.runs.json")]
    base = [sys.executable, "benchmarks/convergence.py", "--merge-runs", *files, "--merged-name", "t"]
    base += ["--output", str(tmp_path), "--plot-dir", str(tmp_path)]
    keep = subprocess.run(base, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert keep.returncode == 0, keep.stderr[-3000:]
    both = json.loads((tmp_path / "convergence-t.json").read_text())["sweep_results"]["mezo@1"]
    drop = "convergence-lora-top2-cached-issue14-quiet.runs.json:mezo@1:1"
    proc = subprocess.run(base + ["--drop", drop], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = json.loads((tmp_path / "convergence-t.json").read_text())["sweep_results"]["mezo@1"]
    assert both["seed_list"] == [0, 1, 2] and one["seed_list"] == [0, 2]
    bad = subprocess.run(base + ["--drop", "x.runs.json:mezo@1:1"], cwd=ROOT, capture_output=True, text=True)
    assert bad.returncode != 0 and "no file holds" in bad.stderr


def test_goal_counts_only_learning_rates_that_hold_the_accuracy():
    """A MeZO learning rate that touches the target and collapses is not MeZO's fastest (unless
    ``strict``); a method is measured at its fastest run that ends within one SE of the target."""
    import convergence

    def run(points, fwd_per_step=2):
        curve = [{"forwards": f, "train_s": f / 10, "accuracy": a} for f, a in [(0, 0.5), *points]]
        return {"curve": curve, "forwards_per_step": fwd_per_step, "lr": 1.0}

    sweep = {
        "mezo@1": run([(40, 0.55), (80, 0.62), (120, 0.62)]),  # the target: 0.62, at 80 passes
        "mezo@10": run([(20, 0.63), (80, 0.52), (120, 0.51)]),  # touches it at 20, collapses
        "fzoo@3": run([(30, 0.63), (80, 0.64), (120, 0.64)], 9),
    }
    held = convergence.goal_summary(sweep, n_eval=300)
    assert held["target"] == 0.62 and held["methods"]["mezo"]["run"] == "mezo@1"
    assert held["methods"]["mezo"]["fastest_any"]["run"] == "mezo@10"
    assert held["methods"]["fzoo"]["forwards_ratio"] == 30 / 80
    strict = convergence.goal_summary(sweep, n_eval=300, strict=True)
    assert strict["methods"]["mezo"]["run"] == "mezo@10"
    assert strict["methods"]["fzoo"]["forwards_ratio"] == 30 / 20
    assert not held["methods"]["fzoo"]["goal_met"]  # 0.375 > 1/3
    sweep["fzoo@3"] = run([(20, 0.63), (80, 0.64), (120, 0.64)], 9)
    assert convergence.goal_summary(sweep, n_eval=300)["methods"]["fzoo"]["goal_met"]  # 1/4, 1/4
