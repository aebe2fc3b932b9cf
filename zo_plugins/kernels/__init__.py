"""Triton kernels for the ZO passes (optional: ``pip install 'zo-plugins[triton]'``).

Importing this package does not import Triton; the kernel entry points load it on first use.

* ``resolve_backend(name, device)``: ``"auto"`` | ``"triton"`` | ``"torch"`` -> the backend.
* ``triton_perturb_``, ``triton_perturbed_copy``, ``triton_update_`` take the keyword-only
  arguments of ``zo_plugins.core.passes.perturb_ / perturbed_copy / update_``;
  ``triton_perturbed_copies`` and ``triton_update_foreach_`` launch over many tensors at once.
* ``zo_plugins.kernels.reference``: PyTorch reference of the streams and passes.

See docs/triton.md for the stream definitions and the measured bounds.
"""

from __future__ import annotations

from typing import Any

from ..core.backend import Passes, register_backend
from .backend import BACKENDS, TRITON_INSTALL_HINT, require_triton, resolve_backend, triton_available

_LAZY = (
    "triton_perturb_",
    "triton_perturbed_copy",
    "triton_perturbed_copies",
    "triton_update_",
    "triton_update_foreach_",
    "triton_direction",
    "DEFAULT_BLOCK",
    "SUPPORTED_DTYPES",
)

__all__ = ["BACKENDS", "TRITON_INSTALL_HINT", "resolve_backend", "triton_available", "require_triton", *_LAZY]


def _load_passes() -> Passes:
    """The Triton backend's passes for the core's dispatcher (imports Triton)."""
    require_triton()
    from . import passes, rules

    return Passes(
        passes.triton_perturb_,
        passes.triton_perturbed_copy,
        passes.triton_update_,
        passes.triton_update_foreach_,
        rules.triton_rule_update_foreach_,
    )


register_backend("triton", _load_passes)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        require_triton()
        from . import passes

        return getattr(passes, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
