"""``zo-train``: zeroth-order fine-tuning from YAML, built on ``LightningCLI``.

    zo-train fit --config recipes/quickstart.yaml
    zo-train fit --config recipes/opt-13b-lora.yaml --trainer.max_steps 10
    zo-train fit --config recipes/quickstart.yaml --print_config

Subcommands, ``--print_config``, overrides and ``--ckpt_path`` are LightningCLI's.  The
model is ``zo_plugins.cli.modules.HFTaskModule``, the data ``HFDataModule``; the Trainer's
strategy defaults to ``zo_plugins.lightning.ZOStrategy`` (set ``trainer.strategy`` to
``zo_plugins.lightning.ZODDPStrategy`` for several devices).  The resolved config is saved
as ``config.yaml`` in the run's log directory, next to its checkpoints.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch.cli import LightningCLI
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError("zo-train needs Lightning: pip install 'zo-plugins[lightning,hf]'.") from e

from .modules import ConfigError, HFDataModule, HFTaskModule

__all__ = ["ZOTrainCLI", "main", "check_class_paths"]

DEFAULT_STRATEGY = {"class_path": "zo_plugins.lightning.ZOStrategy", "init_args": {"eps": 1e-3}}


class ZOTrainCLI(LightningCLI):
    """LightningCLI with ZO defaults: the ZO strategy, step-wise logging, config saved with
    the run (overwritten on re-runs into the same directory)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        defaults = {"strategy": DEFAULT_STRATEGY, "log_every_n_steps": 10}
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)  # reproducible runs unless asked otherwise
        super().__init__(*args, trainer_defaults=defaults, **kwargs)


def _import_class_path(path: str) -> bool:
    mod, _, attr = path.rpartition(".")
    if not mod:
        return True  # a bare class name: jsonargparse resolves it among known subclasses
    try:
        return hasattr(importlib.import_module(mod), attr)
    except ImportError:
        return False


def _walk_class_paths(node: Any, where: str):
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "class_path" and isinstance(v, str):
                yield v, where
            else:
                yield from _walk_class_paths(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_class_paths(v, f"{where}[{i}]")


def check_class_paths(argv: list[str]) -> None:
    """Fail with one sentence on a ``class_path`` that does not import, before jsonargparse
    prints a page of union-type errors.  Looks in ``--config`` files and in overrides."""
    import yaml

    found: list[tuple[str, str]] = []
    for i, arg in enumerate(argv):
        value = argv[i + 1] if i + 1 < len(argv) else None
        if "=" in arg and arg.startswith("--"):
            arg, value = arg.split("=", 1)
        if arg in ("--config", "-c") and value and Path(value).is_file():
            doc = yaml.safe_load(Path(value).read_text()) or {}
            found += list(_walk_class_paths(doc, ""))
        elif arg.startswith("--") and (arg.endswith(".class_path") or arg.endswith("strategy")) and value:
            if "." in value and not value.startswith("-"):
                found.append((value, arg[2:]))
    for path, where in found:
        if not _import_class_path(path):
            raise SystemExit(
                f"zo-train: unknown class_path {path!r} at {where}: check the spelling of the module and class "
                "(e.g. zo_plugins.lightning.ZOStrategy) or install the package that provides it."
            )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``zo-train`` console script."""
    check_class_paths(sys.argv[1:] if args is None else list(args))
    # HFTaskModule tokenises in on_before_batch_transfer on purpose (once per batch, not per ZO forward)
    warnings.filterwarnings("ignore", message=".*overridden `on_before_batch_transfer`.*")
    try:
        ZOTrainCLI(HFTaskModule, HFDataModule, args=args)
    except (ConfigError, FileNotFoundError) as e:
        raise SystemExit(f"zo-train: {e}") from e
    except ValueError as e:
        if str(e).startswith(("ZOConfig.", "ZOStrategy got")):  # a bad ZO setting in the YAML
            raise SystemExit(f"zo-train: {e}") from e
        raise


if __name__ == "__main__":  # pragma: no cover
    main()
