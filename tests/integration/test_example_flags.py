"""The main job's method flags (``examples/rotten_tomatoes.py --estimator/--optimizer``) reach
``ZOCallback``'s config, and a bad combination is refused before the model is loaded."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest

from zo_plugins import ZOCallback

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location(
        "rotten_tomatoes_flags", ROOT / "examples" / "rotten_tomatoes.py"
    )
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_defaults_are_mezo_and_fzoo_flags_reach_the_callback(example):
    default = ZOCallback(**example.zo_config_fields(example.parse_args([]))).config
    assert (default.estimator, default.optimizer, default.n_queries, default.distribution) == (
        "spsa",
        "zo-sgd",
        1,
        "gaussian",
    )
    argv = ["--estimator", "fzoo", "--n-queries", "4", "--distribution", "rademacher", "--eps", "0.02"]
    cfg = ZOCallback(**example.zo_config_fields(example.parse_args(argv))).config
    assert (cfg.estimator, cfg.n_queries, cfg.distribution, cfg.eps) == ("fzoo", 4, "rademacher", 0.02)
    hizoo = example.zo_config_fields(example.parse_args(["--estimator", "hizoo", "--optimizer", "hizoo"]))
    assert ZOCallback(**hizoo).config.optimizer == "hizoo"


def test_a_bad_combination_fails_before_the_model_loads(example, monkeypatch, tmp_path):
    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the flags were checked")

    monkeypatch.setattr(example, "load_model_and_tokenizer", no_load)
    with pytest.raises(ValueError, match="optimizer='hizoo'"):
        example.main(["--estimator", "hizoo", "--output-dir", str(tmp_path)])
    assert not any(tmp_path.iterdir())  # nothing written either
