"""``zo-train``: zeroth-order fine-tuning from YAML, built on ``LightningCLI``.

    zo-train fit --config quickstart
    zo-train fit --config opt-13b-lora --trainer.max_steps 10
    zo-train fit --config my-run.yaml --print_config

``--config NAME`` (or ``--config recipe:NAME``) names a recipe shipped in
``zo_plugins/recipes/`` (the checkout's ``recipes/`` links there), so it works from an
installed wheel too; any other value is a YAML file, as in LightningCLI.  Subcommands,
``--print_config``, overrides and ``--ckpt_path`` are LightningCLI's.  The model is
``zo_plugins.cli.modules.HFTaskModule``, the data ``HFDataModule``; the Trainer's strategy
defaults to ``zo_plugins.lightning.ZOStrategy`` (set ``trainer.strategy`` to
``zo_plugins.lightning.ZODDPStrategy`` for several devices).  The resolved config is saved
as ``config.yaml`` in the run's log directory, next to its checkpoints.  Needs
``pip install 'zo-plugins[train]'``.
"""

from __future__ import annotations

import importlib
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from . import INSTALL_TRAIN, TRAIN_PACKAGES, missing_packages

try:
    from lightning.pytorch.cli import LightningCLI
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(f"zo-train needs Lightning: {INSTALL_TRAIN}.") from e

from .modules import ConfigError, HFDataModule, HFTaskModule

__all__ = [
    "ZOTrainCLI",
    "main",
    "check_class_paths",
    "available_recipes",
    "recipe_path",
    "resolve_recipes",
    "RECIPE_DIR",
]

DEFAULT_STRATEGY = {"class_path": "zo_plugins.lightning.ZOStrategy", "init_args": {"eps": 1e-3}}
RECIPE_DIR = Path(__file__).resolve().parent.parent / "recipes"
"""The recipes shipped with the package (package data; the checkout's ``recipes/`` links here)."""
RECIPE_PREFIX = "recipe:"
# A value of --config that can only be a recipe name: no path separator, no YAML syntax.
_BARE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


def available_recipes() -> list[str]:
    """The names ``zo-train fit --config NAME`` accepts, e.g. ``quickstart``, ``opt-13b-lora``."""
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    """The shipped recipe file for ``name`` (``quickstart``, ``recipe:quickstart`` or
    ``quickstart.yaml``).  An unknown name raises ``ConfigError`` listing the known ones."""
    stem = name.removeprefix(RECIPE_PREFIX)
    for suffix in (".yaml", ".yml"):
        stem = stem.removesuffix(suffix)
    path = RECIPE_DIR / f"{stem}.yaml"
    if not _BARE_NAME.fullmatch(stem) or not path.is_file():
        raise ConfigError(
            f"--config {name!r} is neither a YAML file nor a shipped recipe; the recipes are "
            f"{', '.join(available_recipes())} (e.g. zo-train fit --config quickstart)."
        )
    return path


def _config_value(value: str) -> str:
    if value.startswith(RECIPE_PREFIX):
        return str(recipe_path(value))
    if _BARE_NAME.fullmatch(value) and not Path(value).exists():
        return str(recipe_path(value))
    return value


def resolve_recipes(argv: list[str]) -> list[str]:
    """``argv`` with each ``--config`` / ``-c`` value that names a shipped recipe replaced by
    the recipe's path: ``recipe:NAME`` always, a bare ``NAME`` (or ``NAME.yaml``) when no file
    of that name exists.  Paths and inline YAML pass through unchanged."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("--config", "-c") and i + 1 < len(argv):
            out += [arg, _config_value(argv[i + 1])]
            i += 2
            continue
        if arg.startswith("--config="):
            arg = "--config=" + _config_value(arg.removeprefix("--config="))
        out.append(arg)
        i += 1
    return out


def _recipes_epilog() -> str:
    return (
        f"Shipped recipes (--config NAME or --config recipe:NAME): {', '.join(available_recipes())}; "
        f"they lie in {RECIPE_DIR}."
    )


class ZOTrainCLI(LightningCLI):
    """LightningCLI with ZO defaults: the ZO strategy, step-wise logging, config saved with
    the run (overwritten on re-runs into the same directory)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        defaults = {"strategy": DEFAULT_STRATEGY, "log_every_n_steps": 10}
        defaults.update(kwargs.pop("trainer_defaults", None) or {})
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("seed_everything_default", 0)  # reproducible runs unless asked otherwise
        # the shipped recipes close `zo-train --help` and `zo-train fit --help`
        parser_kwargs = dict(kwargs.pop("parser_kwargs", None) or {})
        epilog = _recipes_epilog()
        parser_kwargs.setdefault("epilog", epilog)
        for sub in self.subcommands():
            parser_kwargs[sub] = {"epilog": epilog, **parser_kwargs.get(sub, {})}
        kwargs["parser_kwargs"] = parser_kwargs
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
    missing = missing_packages(TRAIN_PACKAGES)
    if missing:
        raise SystemExit(f"zo-train needs {', '.join(missing)}: {INSTALL_TRAIN}.")
    try:
        argv = resolve_recipes(sys.argv[1:] if args is None else list(args))
    except ConfigError as e:
        raise SystemExit(f"zo-train: {e}") from e
    if args is None:
        # the console script: LightningCLI reads sys.argv, and DDP launchers re-run it per rank
        sys.argv[1:] = argv
    else:
        args = argv
    check_class_paths(argv)
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
