"""Command-line entry points: zo-train (LightningCLI) and zo-replay."""

from __future__ import annotations

import importlib.util
import sys

INSTALL_TRAIN = "pip install 'zo-plugins[train]'"
"""The install line for everything ``zo-train`` imports (the ``train`` extra)."""
INSTALL_REPLAY = "pip install 'zo-plugins[hf]'"
"""The install line for ``zo-replay`` (transformers, safetensors: the ``hf`` extra)."""
TRAIN_PACKAGES = ("lightning", "jsonargparse", "transformers", "datasets")
"""The import names ``zo-train`` needs; each comes with the ``train`` extra."""


def missing_packages(names: tuple[str, ...] | list[str]) -> list[str]:
    """The names among ``names`` that cannot be imported here (without importing them)."""
    missing = []
    for name in names:
        if name in sys.modules:
            if sys.modules[name] is None:  # blocked, as tests do to simulate a missing package
                missing.append(name)
        elif importlib.util.find_spec(name) is None:
            missing.append(name)
    return missing
