"""What a ``ZOOptimizer`` reports about each update, and the one warning a run gets.

``StepWatch.note_update`` records the norm of the gradient estimate and of the update
(``ZOStepInfo.grad_norm`` / ``update_norm``, logged by the integrations) and warns once when
one update moves the trainable weights by more than their norm; ``note_loss`` warns once when
the loss has grown tenfold since the first step. Both catch the usual first mistake: a
backprop-sized learning rate, which diverges under ZO.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

from .passes import ParamSpec
from .plan import StepPlan

__all__ = ["StepWatch", "UPDATE_NORM_WARNING", "sum_of_squares"]

logger = logging.getLogger("zo_plugins")

UPDATE_NORM_WARNING = 1.0
"""Warn when one update moves the trainable weights by more than this fraction of their norm."""


def sum_of_squares(t: torch.Tensor, chunk_size: int) -> float:
    """``sum(t**2)`` in float64, one chunk at a time: a float64 copy of a whole embedding
    (``t.double().square()``) measured +590 MiB over the model at the first step of OPT-125m."""
    flat = t.detach().reshape(-1)
    return sum(float(c.double().square().sum()) for c in flat.split(chunk_size))


def _lrs(lrs) -> object:
    lrs = sorted(set(lrs))
    return lrs[0] if len(lrs) == 1 else lrs


class StepWatch:
    """The update's norms and the run's divergence warnings (at most one warning a run)."""

    def __init__(self) -> None:
        self.grad_norm = float("nan")
        self.update_norm = float("nan")
        self.weight_norm: float | None = None  # taken once, at the first update
        self.warned = False
        self.first_loss: float | None = None

    def clear(self) -> None:
        self.grad_norm = self.update_norm = float("nan")

    def note_update(
        self,
        plan: StepPlan,
        terms: Sequence[tuple[int, float]],
        rule: str | None,
        groups,
        projected_grads: Sequence[float],
        specs: Sequence[ParamSpec],
        offload,
        chunk_size: int,
    ) -> None:
        """Record the norms of step ``plan.step``'s gradient estimate and update; warn when the
        update is larger than the weights."""
        own = math.sqrt(sum((g / len(plan.seeds)) ** 2 for g in projected_grads))
        dims = sum(s.global_numel for _, _, gspecs in groups for s in gspecs)
        self.grad_norm = own * math.sqrt(dims)
        amp = math.sqrt(sum(c * c for _, c in terms)) if rule in (None, "momentum") else 1.0
        sq = sum((lr * amp) ** 2 * sum(s.global_numel for s in gspecs) for lr, _, gspecs in groups)
        norm = self.update_norm = math.sqrt(sq)
        if self.warned or not math.isfinite(norm) or norm == 0.0:
            return
        if self.weight_norm is None:
            with torch.no_grad():
                self.weight_norm = math.sqrt(  # a shard's sum scaled to its whole tensor (an estimate)
                    sum(
                        sum_of_squares(s.param, chunk_size) * s.global_numel / max(s.param.numel(), 1)
                        for s in specs
                        if offload is None or not offload.owns(s)
                    )
                    # offloaded blocks: their sums taken on this step's visits (core.offload)
                    + (sum(offload.sumsq.values()) if offload is not None and offload.sumsq else 0.0)
                )
            if offload is not None:
                offload.sumsq = None
        if self.weight_norm > 0 and norm > UPDATE_NORM_WARNING * self.weight_norm:
            self.warned = True
            logger.warning(
                "ZO step %d moves the trainable weights by %.3g times their norm (lr=%s, |projected "
                "grad|=%.3g): a backprop-sized learning rate diverges under zeroth-order training. "
                "ZO needs learning rates 100-10,000x smaller: MeZO uses 1e-7 to 1e-5 for full-parameter "
                "fine-tuning and 1e-5 to 1e-3 for LoRA (with eps 1e-3 / 1e-2).",
                plan.step,
                norm / self.weight_norm,
                _lrs(lr for lr, _, _ in groups),
                max(abs(g) for g in projected_grads),
            )

    def note_loss(self, step: int, loss: float, maximize: bool, lrs: Sequence[float]) -> None:
        """Warn once when the loss has grown tenfold since the first step (minimising): a run
        that diverges, most often from a backprop-sized learning rate."""
        if self.warned or maximize or not math.isfinite(loss):
            return
        if self.first_loss is None:
            self.first_loss = loss
            return
        if loss > 10 * abs(self.first_loss) + 1.0:
            self.warned = True
            logger.warning(
                "ZO step %d: the loss went from %.4g to %.4g since the first step: the run diverges (lr=%s). "
                "ZO needs learning rates 100-10,000x smaller than backprop: MeZO uses 1e-7 to 1e-5 for "
                "full-parameter fine-tuning and 1e-5 to 1e-3 for LoRA.",
                step,
                self.first_loss,
                loss,
                _lrs(lrs),
            )
