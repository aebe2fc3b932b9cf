"""benchmarks/convergence.py's issue-14 verdict: the target is MeZO's best seed-mean accuracy,
each method is read at its fastest learning rate, and runs made in several sittings (a seed-0
sweep, then seeds 1-2 of the contenders) merge into seed means.  Synthetic curves, no model."""

from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def conv():
    spec = importlib.util.spec_from_file_location(
        "convergence_goal_bench", ROOT / "benchmarks" / "convergence.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def run(accs, per_step=2, s_per_pass=0.1, lr=1e-3, every=10):
    curve = [
        {"forwards": i * every, "train_s": i * every * s_per_pass, "accuracy": a, "loss": 1.0, "n": 300}
        for i, a in enumerate(accs)
    ]
    return {
        "config": {},
        "lr": lr,
        "forwards_per_step": per_step,
        "train_time_s": curve[-1]["train_s"],
        "curve": curve,
    }


def test_fastest_lr_is_compared_with_mezo_fastest_and_all_three_conditions_decide(conv):
    sweep = {
        "mezo@1": conv.mean_curves([{"k": run([0.5, 0.5, 0.55, 0.6, 0.62, 0.65])}])[
            "k"
        ],  # best final: target
        "mezo@3": conv.mean_curves([{"k": run([0.5, 0.6, 0.63, 0.65, 0.64, 0.63])}])[
            "k"
        ],  # fastest: 30 passes
        "fast@1": conv.mean_curves([{"k": run([0.5, 0.66, 0.66, 0.66, 0.66, 0.66], s_per_pass=0.04)}])["k"],
        "dear@1": conv.mean_curves([{"k": run([0.5, 0.66, 0.66, 0.66, 0.66, 0.66], s_per_pass=0.3)}])["k"],
        "drops@1": conv.mean_curves([{"k": run([0.5, 0.66, 0.6, 0.55, 0.5, 0.5], s_per_pass=0.01)}])["k"],
    }
    goal = conv.goal_summary(sweep, 300)
    assert goal["target"] == pytest.approx(0.65) and goal["target_run"] == "mezo@1"
    m = goal["methods"]
    assert m["mezo"]["forwards"] == 30 and m["mezo"]["run"] == "mezo@3", "MeZO at its fastest lr"
    assert m["fast"]["forwards_ratio"] == pytest.approx(1 / 3) and m["fast"]["goal_met"]
    assert m["dear"]["forwards_ratio"] == pytest.approx(1 / 3) and not m["dear"]["goal_met"], "seconds too"
    assert not m["drops"]["goal_met"], "a final accuracy more than one standard error below the target fails"
    table = conv.goal_table(goal)
    assert table.count("**yes**") == 1
    # at one load: passes to the target x each method's interleaved seconds per pass
    cost = {"mezo": {"median_s_per_forward": 0.1}, "dear": {"median_s_per_forward": 0.1}}
    timed = conv.goal_summary(sweep, 300, cost)["methods"]
    assert timed["dear"]["seconds_at_step_cost_ratio"] == pytest.approx(1 / 3), "its load, not its pass cost"
    assert "seconds_at_step_cost_ratio" not in timed["fast"], "untimed methods get none"
    assert timed["dear"]["goal_met"] is False
    assert "interleaved" in conv.goal_table(conv.goal_summary(sweep, 300, cost))


def test_merge_runs_averages_seeds_across_files_and_refuses_a_seed_twice(conv, tmp_path):
    a, b = tmp_path / "a.runs.json", tmp_path / "b.runs.json"
    a.write_text(
        json.dumps({"lr": 1e-3, "eps": 1e-3, "runs": [{"mezo@1": run([0.5, 0.6])}]})
    )  # seeds not recorded
    b.write_text(
        json.dumps(
            {
                "lr": 1e-3,
                "eps": 1e-3,
                "seeds": [1, 2],
                "runs": [{"mezo@1": run([0.5, 0.7])}, {"mezo@1": run([0.5, 0.8]), "x@1": run([0.5, 0.9])}],
            }
        )
    )
    sweep, settings = conv.merge_runs([f"{a}:0", str(b)])
    assert settings == {"lr": 1e-3, "eps": 1e-3}
    assert sweep["mezo@1"]["seeds"] == 3 and sweep["mezo@1"]["seed_list"] == [0, 1, 2]
    last = sweep["mezo@1"]["curve"][-1]
    assert last["accuracy"] == pytest.approx(0.7) and (last["accuracy_min"], last["accuracy_max"]) == (
        0.6,
        0.8,
    )
    assert sweep["x@1"]["seeds"] == 1
    with pytest.raises(SystemExit, match="twice"):
        conv.merge_runs([f"{a}:1", str(b)])
    c = tmp_path / "c.runs.json"
    c.write_text(json.dumps({"lr": 2e-3, "eps": 1e-3, "runs": [{"mezo@1": run([0.5, 0.6])}]}))
    with pytest.raises(SystemExit, match="differ"):
        conv.merge_runs([f"{a}:0", f"{c}:5"])
