"""The integration layer the Hugging Face and Lightning integrations share.

A training framework runs its own loop; ZO has to fit into it without forking it.  What is
the same whatever the loop, and lives here once:

* **the optimizer**: a ``ZOOptimizer`` over the trainable tensors of the framework's own
  optimizer, with its param groups (so the framework's scheduler and its decay / no-decay
  split apply); groups the framework adds later (``add_param_group``, Lightning's fine-tuning
  callbacks) join at the next step, ``lr`` / ``weight_decay`` are copied before every update.
  On a quantized model with ``quantized='scales'`` it trains the quantization scales instead
  (``zo_plugins.quant``), with the lr / weight decay of the framework's first group;
* **micro-batches**: ``micro_batch(closure, step)`` runs the estimate and returns the loss as
  ``leaf.clone()``, ``leaf`` a fresh scalar that requires grad; the framework scales it
  (1/GA, token counts, loss scale) and calls ``backward``, and a hook on ``leaf`` receives the
  factor it would have back-propagated, so ``sum(factor * g)`` reproduces first-order
  gradient accumulation exactly; a loss scaler's scale is divided out;
* **the probe**: the last micro-batch's closure and loss, for rules that test a candidate
  update ('zo-sgd-conservative');
* **the update**: ``finish(step)`` all-reduces the accumulated projected gradients (one
  small collective) and applies the update, returning the step's metrics;
* **abort safety**: ``ZOOptimizer.estimate`` returns with the weights unperturbed, so control
  never goes back to the framework with perturbed weights, and the update pass holds Ctrl-C
  until it has finished; ``abort()`` drops a half-accumulated step;
* **checkpoints**: ``state_dict()`` / ``load_state_dict()`` carry the optimizer's whole state
  (momentum buffers, Adam moments, stateless-momentum history, counters, step) and, when it
  trains a quantized model's scales, the scales themselves.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from ..core.estimators import ZOEstimate
from ..core.optimizer import ZOOptimizer
from ..quant import quantized_scales, resolve_quantized

__all__ = ["ZODriver", "STATE_VERSION"]

logger = logging.getLogger("zo_plugins")

STATE_VERSION = 1
"""Version of the dict ``ZODriver.state_dict`` returns."""


class ZODriver:
    """See the module docstring.  ``owner`` names the integration in error messages."""

    def __init__(
        self,
        config: ZOConfig,
        *,
        owner: str,
        ranking_oracle: Callable[[list[Any]], Sequence[int]] | None = None,
        mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None = None,
    ) -> None:
        if config.batched_copies:
            raise ValueError(
                f"{owner}(batched_copies=True): batched copies need a closure that takes the number of "
                "copies, which only ZOOptimizer.step(closure) calls; the training loop runs the model's own "
                "forward. Use batched_copies=False here (FZOO then makes its n_queries + 1 forwards one by one)."
            )
        self.config = config
        self.owner = owner
        self.ranking_oracle = ranking_oracle
        self.mask_fn = mask_fn
        self.optimizer: ZOOptimizer | None = None
        self.trains_scales = False
        """The optimizer trains a quantized model's scales, not the framework's tensors."""
        self.loss_scale: Callable[[], float | None] = lambda: None
        self.last_calls = 0
        self._framework_index: list[int] = []  # framework group index of each of our groups
        self._framework_groups = 0
        self.reset_step()

    # ------------------------------------------------------------------ setup
    def build(self, framework_optimizer: Any, model: nn.Module) -> ZOOptimizer:
        """A ZOOptimizer over ``framework_optimizer``'s trainable tensors (its groups, lr, wd),
        or, when ``ZOConfig.quantized`` resolves to 'scales', over the model's quantization
        scales with the lr / weight decay of the framework's first group."""
        self.trains_scales = resolve_quantized(model, self.config.quantized) == "scales"
        if self.trains_scales:
            first = _inner(framework_optimizer).param_groups[0]
            scales = [s.tensor for s in quantized_scales(model)]
            groups = [
                (0, {"params": scales, "lr": first["lr"], "weight_decay": first.get("weight_decay", 0.0)})
            ]
            logger.info(
                "%s: training the %d quantization scale tensors of the quantized model (quantized='scales'); "
                "the tensors its optimizer holds stay frozen.",
                self.owner,
                len(scales),
            )
        else:
            groups = self._new_groups(framework_optimizer, start=0)
        if not groups:
            raise ValueError(
                f"{self.owner}: the optimizer holds no trainable parameters (requires_grad=True); "
                "unfreeze what should train, or check the optimizer's param groups."
            )
        self.optimizer = ZOOptimizer(
            [g for _, g in groups],
            lr=groups[0][1]["lr"],
            model=model,
            ranking_oracle=self.ranking_oracle,
            mask_fn=self.mask_fn,
            **self.config.to_dict(),
        )
        self._framework_index = [i for i, _ in groups]
        self._framework_groups = len(_inner(framework_optimizer).param_groups)
        self.reset_step()
        return self.optimizer

    def _new_groups(self, framework_optimizer: Any, start: int) -> list[tuple[int, dict[str, Any]]]:
        if self.trains_scales:
            return []  # the trainable set is the scales; the framework's tensors stay frozen
        mine = {id(p) for g in (self.optimizer.param_groups if self.optimizer else []) for p in g["params"]}
        out = []
        for i, g in enumerate(_inner(framework_optimizer).param_groups[start:], start=start):
            params = [p for p in g["params"] if p.requires_grad and id(p) not in mine]
            if params:
                out.append((i, {"params": params, "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0)}))
        return out

    def sync(self, framework_optimizer: Any) -> None:
        """Follow the framework's optimizer: groups added since the last call join (their
        tensors are perturbed and updated from this step on), and every group's ``lr`` and
        ``weight_decay`` are copied (the framework's scheduler sets them)."""
        opt = self._require()
        inner = _inner(framework_optimizer)
        # new groups, and tensors of existing groups that were frozen when training started and
        # have been unfrozen since (Lightning's BaseFinetuning does both)
        for i, g in self._new_groups(framework_optimizer, start=0):
            opt.add_param_group(g)
            self._framework_index.append(i)
        self._framework_groups = len(inner.param_groups)
        for ours, index in zip(opt.param_groups, self._framework_index):
            src = inner.param_groups[index]
            ours["lr"] = src["lr"]
            ours["weight_decay"] = src.get("weight_decay", 0.0)

    def _require(self) -> ZOOptimizer:
        if self.optimizer is None:
            raise RuntimeError(f"{self.owner} is not set up: training has not started.")
        return self.optimizer

    # ------------------------------------------------------------------ one optimizer step
    def reset_step(self) -> None:
        self._acc: list[float] | None = None
        self._skip = False
        self._lp: list[float] = []
        self._lm: list[float] = []
        self._probe: tuple[Callable[[], Any], float] | None = None
        self.outstanding = 0
        """Micro-batch losses handed out whose backward has not arrived yet."""

    def micro_batch(
        self, closure: Callable[[], Any], step: int, device: torch.device
    ) -> tuple[ZOEstimate, torch.Tensor]:
        """Estimate on one micro-batch of optimizer step ``step``; returns the estimate and the
        loss tensor to hand to the framework (see the module docstring)."""
        opt = self._require()
        est = opt.estimate(closure, step=step)
        self.last_calls = est.calls
        """Closure calls of the last micro-batch (integrations correct per-call bookkeeping)."""
        if opt.rule.accept is not None:
            self._probe = (closure, est.loss)  # the last micro-batch probes the update
        value = est.loss
        if not math.isfinite(value) and not est.skipped:
            value = 0.0  # a ranking oracle over non-numeric outputs: no loss to report
        leaf = torch.tensor(value, dtype=torch.float32, device=device, requires_grad=True)
        self.outstanding += 1
        leaf.register_hook(lambda grad, est=est: self._accumulate(float(grad), est))
        return est, leaf.clone()

    def _accumulate(self, factor: float, est: ZOEstimate) -> None:
        self.outstanding -= 1
        scale = self.loss_scale()
        if scale:
            factor /= float(scale)
        if est.skipped:
            self._skip = True
            return
        if self._acc is None:
            self._acc = [0.0] * len(est.projected_grads)
        for i, g in enumerate(est.projected_grads):
            self._acc[i] += factor * g
        # factor-weighted, like the gradient: the step's loss as the framework defines it
        if est.losses_plus:
            self._lp.append(factor * est.losses_plus[-1])
        if est.losses_minus:
            self._lm.append(factor * est.losses_minus[-1])

    @property
    def has_estimates(self) -> bool:
        return self._acc is not None or self._skip

    def finish(self, step: int, framework_optimizer: Any) -> dict[str, float]:
        """All-reduce and apply optimizer step ``step``; returns its metrics
        (``projected_grad``, ``loss_plus``, ``loss_minus`` when applied; the counters)."""
        opt = self._require()
        self.sync(framework_optimizer)
        skip = self._skip or self._acc is None  # None: no micro-batch gave an estimate
        grads, skipped = opt.reduce_projected_grads(self._acc or [], skip)
        lp = sum(self._lp) if self._lp else float("nan")
        lm = sum(self._lm) if self._lm else float("nan")
        probe, baseline = self._probe or (None, None)
        opt.finish_step(
            grads, skipped, step=step, loss_plus=lp, loss_minus=lm, probe=probe, baseline=baseline
        )
        self.reset_step()
        info = opt.last_step
        lp, lm = info.loss_plus, info.loss_minus  # perturbation parallelism: the pairs' exchanged losses
        metrics = {
            "zo_skipped_steps": float(opt.skipped_steps),
            "zo_clipped_steps": float(opt.clipped_steps),
            "zo_rejected_steps": float(opt.rejected_steps),
        }
        if not info.skipped:
            metrics.update(
                projected_grad=info.projected_grad, loss_plus=lp, loss_minus=lm, zo_grad_norm=info.grad_norm
            )
        return metrics

    def abort(self) -> None:
        """Drop a half-accumulated step (the weights are already unperturbed)."""
        if self.optimizer is not None:
            self.optimizer.restore()
        self.reset_step()

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        opt = self._require()
        state: dict[str, Any] = {"version": STATE_VERSION, "optimizer": opt.state_dict()}
        if self.trains_scales:
            # a framework's checkpoint need not restore a quantized layer's state (the Trainer's
            # resume drops bitsandbytes' absmax as "unexpected keys"), so the trained scales --
            # small: one per row or per block of 64 weights -- ride with the ZO state
            state["scales"] = {s.name: s.param.detach() for s in opt.specs()}
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION or "optimizer" not in state:
            raise ValueError(
                f"{self.owner}: the checkpoint's ZO state is not one this version reads "
                f"(expected version {STATE_VERSION}, got {state.get('version') if isinstance(state, dict) else state!r})."
            )
        opt = self._require()
        scales = state.get("scales")
        if scales is not None or self.trains_scales:
            specs = {s.name: s for s in opt.specs()}
            if scales is None or set(scales) != set(specs):
                raise ValueError(
                    f"{self.owner}: the checkpoint's trained quantization scales do not match this run's "
                    f"(checkpoint: {len(scales or {})} scale tensors, run: {len(specs)} with "
                    f"quantized={self.config.quantized!r}); resume with the model and ZO settings that wrote it."
                )
            bad = [n for n, v in scales.items() if tuple(v.shape) != tuple(specs[n].param.shape)]
            if bad:
                raise ValueError(
                    f"{self.owner}: the checkpoint's scale {bad[0]!r} has another shape than the model's."
                )
        opt.load_state_dict(state["optimizer"])
        if scales is not None:
            with torch.no_grad():
                for name, value in scales.items():
                    specs[name].param.copy_(value)


def _inner(optimizer: Any) -> Any:
    """accelerate's AcceleratedOptimizer wraps the real optimizer as ``.optimizer``."""
    return getattr(optimizer, "optimizer", optimizer)
