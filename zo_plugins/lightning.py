"""``zo_plugins.lightning``: the Lightning strategies and callback.

``from zo_plugins.lightning import ZOStrategy, ZODDPStrategy, ZOModelParallelStrategy, ZOLightningCallback``.  Lightning
is imported only when one of these names is used; without it the import fails with the
``pip install`` line to run.  Importing them also registers the strategy names ``"zo"`` and
``"zo_ddp"`` (``L.Trainer(strategy="zo")``), and ``"zo_model_parallel"`` (FSDP2).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and linters; at run time __getattr__ imports lazily
    from .integrations.lightning import (
        ZODDPStrategy,
        ZOLightningCallback,
        ZOMixin,
        ZOModelParallelStrategy,
        ZOStrategy,
    )

__all__ = ["ZOMixin", "ZOStrategy", "ZODDPStrategy", "ZOModelParallelStrategy", "ZOLightningCallback"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        try:
            from .integrations import lightning as _impl
        except ImportError as e:
            if "zo-plugins[lightning]" in str(e):
                raise
            raise ImportError(
                f"zo_plugins.lightning.{name} needs Lightning: pip install 'zo-plugins[lightning]' ({e})."
            ) from e
        return getattr(_impl, name)
    raise AttributeError(f"module 'zo_plugins.lightning' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
