"""zo_plugins: zeroth-order (MeZO-style) fine-tuning inside the training loops you already use."""

from ._version import __version__
from .config import ZOConfig
from .core.optimizer import ZOEstimate, ZOOptimizer, ZOStepInfo
from .core.replay import replay
from .core.trajectory import TrajectoryError, read_trajectory

__all__ = [
    "ZOConfig",
    "ZOOptimizer",
    "ZOStepInfo",
    "ZOEstimate",
    "ZOCallback",
    "ZOTrainer",
    "replay",
    "read_trajectory",
    "TrajectoryError",
    "__version__",
]


def __getattr__(name: str):
    # transformers is imported only when the HF integration is used.
    if name in ("ZOCallback", "ZOTrainer", "ZOTrainerMixin"):
        from .integrations import hf

        return getattr(hf, name)
    raise AttributeError(f"module 'zo_plugins' has no attribute {name!r}")
