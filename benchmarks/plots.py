"""Figures for the benchmarks whose scripts write JSON only: step_cost.py and offload.py.

    python benchmarks/plots.py step-cost benchmarks/results/step_cost-vm.json   # docs/img/step_cost-vm.png
    python benchmarks/plots.py offload benchmarks/results/offload-vm.json       # docs/img/offload-vm.png

Each figure is drawn from the JSON alone (no run), with the machine, date and command the
JSON records in its title, so `bash scripts/benchmarks.sh plots` can redraw every figure of
the docs in seconds. Needs matplotlib (the demo extra).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMG = ROOT / "docs" / "img"
MiB = 1024**2


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _machine(m) -> str:
    if isinstance(m, dict):
        return f"{m.get('host', '?')}: {m.get('cores', '?')} cores, torch {m.get('torch', '?')}"
    return str(m)


def step_cost(path: Path, out: Path) -> Path:
    """Per model: each mode's step time over two no-grad forwards, and its peak memory growth
    over a no-grad forward's."""
    report = json.loads(path.read_text())
    plt = _plt()
    models = list(report["results"])
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(len(models), 1)
    modes = [m for m in report["modes"] if m != "forward"]
    for i, model in enumerate(models):
        runs = report["results"][model]["runs"]
        fwd = runs["forward"]
        present = [m for m in modes if m in runs]
        xs = [modes.index(m) + (i - (len(models) - 1) / 2) * width for m in present]
        axes[0].bar(xs, [runs[m]["step_s"] / (2 * fwd["step_s"]) for m in present], width, label=model)
        axes[1].bar(
            xs, [runs[m]["peak_growth_mib"] / fwd["peak_growth_mib"] for m in present], width, label=model
        )
    for ax, title in zip(
        axes, ("step time / two no-grad forwards", "peak memory growth / a no-grad forward's")
    ):
        ax.set_xticks(range(len(modes)), modes, rotation=30, ha="right")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(
        f"benchmarks/step_cost.py, batch {report['batch']} x {report['seq']}, {report['repeats']} repeats; "
        f"{_machine(report['machine'])}; {report['date']}",
        fontsize=9,
    )
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def offload(path: Path, out: Path) -> Path:
    """Per mode: seconds per step, peak RSS over the process's baseline, and bytes read per step."""
    report = json.loads(path.read_text())
    plt = _plt()
    runs = report["runs"]
    labels = [f"{r['model']}\n{r['mode']}" for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    axes[0].bar(labels, [r["step_s"] for r in runs])
    axes[0].set_title("seconds per step (median after the first)")
    x = list(range(len(runs)))
    axes[1].bar(
        [i - 0.2 for i in x], [r["model_bytes"] / MiB for r in runs], width=0.4, label="the model's weights"
    )
    axes[1].bar([i + 0.2 for i in x], [r["peak_rss_mib"] for r in runs], width=0.4, label="peak RSS")
    axes[1].bar(
        [i + 0.2 for i in x],
        [r["baseline_rss_mib"] for r in runs],
        width=0.4,
        label="RSS before the first step",
    )
    axes[1].set_xticks(x, labels)
    axes[1].set_title("resident memory vs model size (MiB)")
    axes[1].legend(fontsize=8)
    reads = [sum(r["read_bytes_per_step"]) / max(len(r["read_bytes_per_step"]), 1) / MiB for r in runs]
    axes[2].bar(labels, reads)
    axes[2].set_title("bytes read from disk per step (MiB)")
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"benchmarks/offload.py; {report['machine']}; {report['date']}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=["step-cost", "offload"])
    ap.add_argument("json", type=Path, help="a report the benchmark wrote under benchmarks/results/")
    ap.add_argument("--png", type=Path, default=None, help="default: docs/img/<json stem>.png")
    args = ap.parse_args(argv)
    png = args.png or IMG / f"{args.json.stem}.png"
    draw = step_cost if args.kind == "step-cost" else offload
    print(f"wrote {draw(args.json, png)}")


if __name__ == "__main__":
    main()
