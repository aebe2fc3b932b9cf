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
