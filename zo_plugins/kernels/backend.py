"""Choosing between the PyTorch passes and the Triton kernels."""

from __future__ import annotations

import importlib
import os
from functools import lru_cache

import torch

__all__ = ["BACKENDS", "TRITON_INSTALL_HINT", "resolve_backend", "triton_available", "require_triton"]

BACKENDS = ("auto", "triton", "torch")
TRITON_INSTALL_HINT = "pip install 'zo-plugins[triton]'"


@lru_cache(maxsize=1)
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
        importlib.import_module("triton.language")
    except Exception as exc:  # noqa: BLE001 - a broken install counts as missing, with its reason
        return f"{type(exc).__name__}: {exc}"
    return None


def triton_available() -> bool:
    """True if ``triton`` imports (checked once per process)."""
    return _triton_import_error() is None


def require_triton() -> None:
    """Raise ``ImportError`` naming the install line if Triton cannot be imported."""
    err = _triton_import_error()
    if err is not None:
        raise ImportError(
            f"backend='triton' needs the triton package, which could not be imported ({err}). "
            f"Install it with: {TRITON_INSTALL_HINT}  -- or use backend='torch'."
        )


def resolve_backend(name: str, device: torch.device | str) -> str:
    """The backend that runs the passes for tensors on ``device``: ``"triton"`` or ``"torch"``.

    * ``"auto"``: Triton on CUDA devices when it imports, PyTorch otherwise.
    * ``"triton"``: Triton; raises ``ImportError`` with the ``pip install`` line if missing,
      and ``ValueError`` for a non-CUDA device (unless ``TRITON_INTERPRET=1``, for tests).
    * ``"torch"``: the PyTorch passes of ``zo_plugins.core.passes``.
    """
    if name not in BACKENDS:
        raise ValueError(f"backend={name!r} is invalid: use one of {BACKENDS}.")
    device = torch.device(device)
    if name == "torch":
        return "torch"
    if name == "triton":
        require_triton()
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(
                f"backend='triton' runs on CUDA devices; the parameters are on {device}. Use "
                "backend='auto' or 'torch' (or set TRITON_INTERPRET=1 to run the kernels on CPU, "
                "slowly, for tests)."
            )
        return "triton"
    return "triton" if device.type == "cuda" and triton_available() else "torch"
