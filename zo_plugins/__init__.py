"""zo_plugins: zeroth-order (MeZO-style) fine-tuning inside the training loops you already use."""

from ._version import __version__
from .config import ZOConfig
from .core.estimators import ESTIMATORS, Estimator, Probe, register_estimator
from .core.optimizer import ZOEstimate, ZOOptimizer, ZOStepInfo
from .core.replay import replay
from .core.trajectory import TrajectoryError, read_log, read_trajectory
from .core.updates import UPDATE_RULES, UpdateRule, register_update_rule
from .kernels import backend as _kernel_backend  # noqa: F401 - registers the Triton loader (no Triton import)

__all__ = [
    "ZOConfig",
    "ZOOptimizer",
    "ZOStepInfo",
    "ZOEstimate",
    "ZOCallback",
    "ZOTrainer",
    "ZOTrainerMixin",
    "ZOSFTTrainer",
    "zo_trainer",
    "replay",
    "read_trajectory",
    "read_log",
    "TrajectoryError",
    "ESTIMATORS",
    "Estimator",
    "Probe",
    "register_estimator",
    "UPDATE_RULES",
    "UpdateRule",
    "register_update_rule",
    "__version__",
]

_HF = ("ZOCallback", "ZOTrainer", "ZOTrainerMixin", "zo_trainer")


def __getattr__(name: str):
    # transformers (and TRL) are imported only when the HF integration is used.
    if name in _HF:
        from .integrations import hf

        return getattr(hf, name)
    if name == "ZOSFTTrainer":
        from .integrations import trl

        return trl.ZOSFTTrainer
    raise AttributeError(f"module 'zo_plugins' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
