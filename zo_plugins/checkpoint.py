"""Atomic checkpoints for plain-PyTorch / Fabric loops around ``ZOOptimizer``.

A checkpoint is a directory holding ``model.safetensors`` (the model's state), and
``optimizer.pt`` (the optimizer's ``state_dict``, loadable with ``weights_only=True``) and
``meta.json``.  It is written under a temporary name, synced, then renamed into place: a
process killed mid-write leaves no directory that loads as a valid checkpoint, and loading
never executes code (safetensors, ``torch.load(weights_only=True)``, JSON).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint"]

_DONE = "meta.json"
INSTALL = "pip install 'zo-plugins[hf]'"
"""The install line for safetensors, which checkpoints are written with (the ``hf`` extra)."""


def _safetensors_torch() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(f"zo_plugins.checkpoint needs safetensors: {INSTALL}.") from e
    return safetensors.torch


def _sync_dir(path: Path) -> None:
    for f in path.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, **meta: Any
) -> Path:
    """Write ``model`` (and ``optimizer``) to the directory ``path`` atomically."""
    save_model = _safetensors_torch().save_model
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_model(model, str(tmp / "model.safetensors"))
    if optimizer is not None:
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / _DONE).write_text(json.dumps({"format": "zo-checkpoint", "version": 1, **meta}))
    _sync_dir(tmp)
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old)
    return path


def load_checkpoint(
    path: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` into ``model`` (and ``optimizer``);
    returns its metadata."""
    load_model = _safetensors_torch().load_model
    path = Path(path)
    if not (path / _DONE).is_file():
        raise FileNotFoundError(
            f"{path} is not a complete zo_plugins checkpoint (no {_DONE}); use latest_checkpoint() "
            "to find the last complete one."
        )
    meta = json.loads((path / _DONE).read_text())
    load_model(model, str(path / "model.safetensors"))
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    return meta


def latest_checkpoint(root: str | os.PathLike, prefix: str = "checkpoint-") -> Path | None:
    """The complete checkpoint ``root/<prefix>N`` with the largest N, or None."""
    best, best_n = None, -1
    pattern = re.compile(re.escape(prefix) + r"(\d+)$")
    for d in Path(root).glob(prefix + "*"):
        m = pattern.match(d.name)
        if m and (d / _DONE).is_file() and int(m.group(1)) > best_n:
            best, best_n = d, int(m.group(1))
    return best
