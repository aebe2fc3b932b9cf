"""``ZOConfig``: every zeroth-order setting, validated before any weight changes."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .core.noise import DISTRIBUTIONS, GAUSSIAN_BLOCK

__all__ = ["ZOConfig", "DROPOUT_MODES", "PERTURBATION_MODES"]

DROPOUT_MODES = ("same-masks", "eval")
PERTURBATION_MODES = ("auto", "in-place", "out-of-place")


def _help(default: Any, text: str) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass
class ZOConfig:
    """Settings of a zeroth-order (SPSA / MeZO-style) optimiser.

    Every field carries a help string (``ZOConfig.help()`` prints them).  Invalid values
    raise ``ValueError`` naming the field, the value and the valid range.
    """

    eps: float = _help(
        1e-3,
        "Perturbation scale epsilon: the loss is probed at theta + eps*z and theta - eps*z. "
        "MeZO uses 1e-3 for full-parameter runs, 1e-2 for LoRA and 1e-1 for prefix tuning.",
    )
    seed: int = _help(
        0,
        "Base seed. The direction of optimizer step t is a pure function of (seed, t, "
        "parameter name, element offset); the process-global RNG is never reseeded.",
    )
    n_queries: int = _help(
        1,
        "Directions averaged per optimizer step (each costs two forwards). Directions are "
        "regenerated from their seeds, never stored.",
    )
    distribution: str = _help(
        "gaussian",
        "Direction distribution: 'gaussian' (MeZO) or 'rademacher' (+/-1, the cheapest to "
        "generate and bit-identical across backends).",
    )
    dropout: str = _help(
        "same-masks",
        "'same-masks': the RNG state is saved before the first perturbed forward and restored "
        "before the second, so both see the same dropout masks (the difference of the two "
        "losses then measures only the perturbation). 'eval': the model is switched to "
        "eval() for the two forwards, as the MeZO reference does.",
    )
    perturbation: str = _help(
        "auto",
        "'out-of-place': a forward pre-hook hands each module theta + eps*z and the weights "
        "are written only by the update, so a step with lr=0 or a skipped step leaves them "
        "bit-identical in every dtype; costs a transient copy of one module's trainable "
        "tensors. 'in-place': theta is perturbed in place in bounded chunks (the least "
        "memory; float32 round trips drift by a few ulp; refused for fp16/bf16, where they "
        "drift 20-150x a MeZO update). 'auto': in-place for float32/float64 tensors (inference "
        "memory; restore within an ulp), out-of-place for bf16/fp16 tensors (exact).",
    )
    stochastic_rounding: bool = _help(
        True,
        "Round updates of bf16/fp16 weights stochastically (unbiased), so updates smaller "
        "than half an ulp are applied on average instead of being lost.",
    )
    all_reduce: bool = _help(
        True,
        "When torch.distributed is initialised, average the projected gradient (one scalar "
        "per direction) over all ranks before the update.",
    )
    clip_projected_grad: float | None = _help(
        None,
        "Clip the projected gradient to [-c, c] before the update (QZO's directional-derivative "
        "clipping), guarding against exploding estimates; None disables. Clipped steps are "
        "counted (ZOOptimizer.clipped_steps, logged as zo_clipped_steps).",
    )
    trajectory_path: str | None = _help(
        None,
        "Write the run's trajectory (per step: seed, projected gradient, lr, weight decay) to "
        "this JSON-lines file; zo_plugins.replay rebuilds the weights from it bit for bit.",
    )
    chunk_size: int = _help(
        1 << 20,
        "Elements per chunk when directions are generated on the PyTorch path; bounds the "
        "extra memory of a pass (4 bytes per element). A multiple of 65536.",
    )

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        _check_positive_float("eps", self.eps)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ZOConfig.seed={self.seed!r} is invalid: use an integer >= 0.")
        if not isinstance(self.n_queries, int) or isinstance(self.n_queries, bool) or self.n_queries < 1:
            raise ValueError(
                f"ZOConfig.n_queries={self.n_queries!r} is invalid: use an integer >= 1 "
                "(1 is MeZO's setting)."
            )
        _check_choice("distribution", self.distribution, DISTRIBUTIONS)
        _check_choice("dropout", self.dropout, DROPOUT_MODES)
        _check_choice("perturbation", self.perturbation, PERTURBATION_MODES)
        for name in ("stochastic_rounding", "all_reduce"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZOConfig.{name}={getattr(self, name)!r} is invalid: use True or False.")
        if self.clip_projected_grad is not None:
            c = self.clip_projected_grad
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 0:
                raise ValueError(
                    f"ZOConfig.clip_projected_grad={c!r} is invalid: use a finite number > 0, or None "
                    "to disable clipping."
                )
        if self.trajectory_path is not None and not isinstance(self.trajectory_path, (str, os.PathLike)):
            raise ValueError(
                f"ZOConfig.trajectory_path={self.trajectory_path!r} is invalid: use a file path or None."
            )
        if self.trajectory_path is not None:
            self.trajectory_path = os.fspath(self.trajectory_path)
        if (
            not isinstance(self.chunk_size, int)
            or self.chunk_size < GAUSSIAN_BLOCK
            or self.chunk_size % GAUSSIAN_BLOCK
        ):
            raise ValueError(
                f"ZOConfig.chunk_size={self.chunk_size!r} is invalid: use a positive multiple "
                f"of {GAUSSIAN_BLOCK}, e.g. {1 << 20}."
            )

    # ------------------------------------------------------------------ helpers
    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    @classmethod
    def from_kwargs(cls, kwargs: dict[str, Any]) -> tuple[ZOConfig, dict[str, Any]]:
        """Split ``kwargs`` into a ``ZOConfig`` and the keys that are not ZO fields."""
        names = set(cls.field_names())
        ours = {k: v for k, v in kwargs.items() if k in names}
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return cls(**ours), rest

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def help(cls) -> str:
        return "\n".join(f"{f.name} (default {f.default!r}): {f.metadata['help']}" for f in fields(cls))


def _check_positive_float(name: str, value: Any) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise ValueError(f"ZOConfig.{name}={value!r} is invalid: use a finite number > 0 (MeZO uses 1e-3).")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(
            f"ZOConfig.{name}={value!r} is not valid: choose one of {', '.join(map(repr, choices))}."
        )
