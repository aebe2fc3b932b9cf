"""Backend choice lives in ``zo_plugins.core.backend`` (dispatch in one place); these names are
re-exported here for code that imported them from the kernels package."""

from __future__ import annotations

from ..core.backend import (
    BACKENDS,
    TRITON_INSTALL_HINT,
    _triton_import_error,
    require_triton,
    resolve_backend,
    triton_available,
    triton_self_check,
)

__all__ = [
    "BACKENDS",
    "TRITON_INSTALL_HINT",
    "resolve_backend",
    "triton_available",
    "require_triton",
    "triton_self_check",
    "_triton_import_error",
]
