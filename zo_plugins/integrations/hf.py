"""Hugging Face ``transformers.Trainer`` integration: ``ZOCallback`` and the ``ZOTrainer``
fallback.

How a callback alone replaces backprop in the stock Trainer (see docs/hf.md):

* ``on_train_begin`` wraps the model's instance ``forward``.  The wrapper acts only when
  ``model.training and torch.is_grad_enabled()`` (so evaluation, prediction and ``generate``
  run the real forward): it runs the two perturbed forwards under ``no_grad`` through
  ``ZOOptimizer.estimate`` and returns the outputs of the last one with ``loss`` replaced by
  ``leaf.clone()``, ``leaf`` a fresh scalar that requires grad.
* The Trainer scales that loss (1/GA, token-count normalisation, DDP world size, loss scale)
  and calls ``backward``; a hook on ``leaf`` receives exactly the factor it would have
  backpropagated, so ``sum(factor * g)`` over micro-batches reproduces first-order
  semantics for gradient accumulation.  No parameter ``.grad`` is ever created.
* ``on_pre_optimizer_step`` all-reduces the accumulated scalar(s) and applies the update with
  the ``lr`` and ``weight_decay`` of the Trainer's own param groups (so its scheduler and its
  decay/no-decay split apply); the stock ``optimizer.step()`` then finds no gradients.
* The step seed comes from ``state.global_step``, so ``resume_from_checkpoint`` continues
  the exact direction sequence.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

try:
    from transformers import Trainer, TrainerCallback
except ImportError as e:  # pragma: no cover - exercised only without transformers
    raise ImportError(
        "zo_plugins.ZOCallback needs transformers: pip install 'zo-plugins[hf]' "
        "(or pip install 'transformers>=5.23')."
    ) from e

from ..config import ZOConfig
from ..core.optimizer import ZOEstimate, ZOOptimizer, all_reduce_projected_grads

__all__ = ["ZOCallback", "ZOTrainer", "ZOTrainerMixin", "quarantine_incomplete_checkpoints"]

logger = logging.getLogger("zo_plugins")
_FALLBACK_HINT = (
    "Use zo_plugins.ZOTrainer (a Trainer subclass that wraps compute_loss) in place of "
    "Trainer(callbacks=[ZOCallback()])."
)


def _extract_loss(outputs: Any) -> torch.Tensor:
    loss = None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    elif isinstance(outputs, torch.Tensor):
        loss = outputs
    if loss is None:
        raise RuntimeError(
            "ZOCallback: the model returned no loss in training. The Trainer removes `labels` "
            "before the forward when label_smoothing_factor > 0 or compute_loss_func is set, "
            "and ZO needs the loss inside the forward. " + _FALLBACK_HINT
        )
    return loss


class ZOCallback(TrainerCallback):
    """Zeroth-order training in the stock ``transformers.Trainer``.

    ``Trainer(model, args, ..., callbacks=[ZOCallback(eps=1e-3, seed=0)])``.  Accepts every
    ``ZOConfig`` field as a keyword.  The learning rate, scheduler, weight decay groups,
    gradient accumulation, evaluation, saving and resuming are the Trainer's own.

    ``objective=fn`` replaces the loss by ``fn(model, batch)`` (any scalar: an accuracy, an
    F1 of generated text, a reward); with ``maximize=True`` it is maximised.  Inside ``fn``,
    calling the model runs its real forward on the perturbed weights.

    Logs ``projected_grad``, ``loss_plus``, ``loss_minus`` (means since the last log) and
    ``zo_skipped_steps`` into the Trainer's logs.
    """

    def __init__(
        self, objective: Callable[[nn.Module, dict[str, Any]], Any] | None = None, **zo_config_fields: Any
    ) -> None:
        self.config = ZOConfig(**zo_config_fields)
        if objective is not None and not callable(objective):
            raise ValueError(
                f"ZOCallback(objective=...) must be callable (model, batch) -> scalar, not {objective!r}."
            )
        self.objective = objective
        self.optimizer: ZOOptimizer | None = None
        self._model: nn.Module | None = None
        self._had_forward = False
        self._old_forward: Any = None
        self._wrap_forward = True  # ZOTrainer turns this off and calls zo_loss itself
        self._hf_groups: list[int] = []
        self._scaler: Any = None
        self._step = 0
        self._reset_step()
        self._reset_log()

    # ------------------------------------------------------------------ bookkeeping
    def _reset_step(self) -> None:
        self._acc: list[float] | None = None
        self._skip = False
        self._lp: list[float] = []
        self._lm: list[float] = []
        self._pending_hooks = 0
        self._last_probe: tuple[Callable[[], Any], float] | None = None

    def _reset_log(self) -> None:
        self._log_g: list[float] = []
        self._log_lp: list[float] = []
        self._log_lm: list[float] = []

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._wrap_forward and getattr(args, "label_smoothing_factor", 0) > 0:
            raise ValueError(
                f"ZOCallback cannot serve label_smoothing_factor={args.label_smoothing_factor}: "
                "the Trainer pops the labels before the forward. " + _FALLBACK_HINT
            )
        if model is None or optimizer is None:
            raise RuntimeError("ZOCallback.on_train_begin needs the model and optimizer from the Trainer.")
        self._model = model
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        groups, self._hf_groups = [], []
        for i, g in enumerate(inner.param_groups):
            params = [p for p in g["params"] if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": g["lr"], "weight_decay": g.get("weight_decay", 0.0)})
                self._hf_groups.append(i)
        if not groups:
            raise ValueError("ZOCallback: the model has no trainable parameters (requires_grad=True).")
        self.optimizer = ZOOptimizer(
            groups, lr=groups[0]["lr"], model=model, **{k: v for k, v in self.config.to_dict().items()}
        )
        self._inner_optimizer = inner
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            # fp16 GradScaler: its step() asserts when no inf checks were recorded. Detach it
            # from the optimizer and divide the factor the hook receives by its scale.
            self._scaler, optimizer.scaler = scaler, None
        if self._wrap_forward:
            self._install_forward(model)
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self._reset_step()
        self._step = state.global_step
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        opt = self.optimizer
        if opt is None:
            return control
        for ours, hf_index in zip(opt.param_groups, self._hf_groups):
            src = self._inner_optimizer.param_groups[hf_index]
            ours["lr"] = src["lr"]
            ours["weight_decay"] = src.get("weight_decay", 0.0)
        if self._acc is None and not self._skip:
            raise RuntimeError(
                "ZOCallback saw no training forward in this optimizer step: the Trainer called "
                "the model without going through its `forward` attribute. " + _FALLBACK_HINT
            )
        grads, skipped = all_reduce_projected_grads(self._acc or [], self._skip, self.config)
        lp = sum(self._lp) if self._lp else float("nan")
        lm = sum(self._lm) if self._lm else float("nan")
        probe, baseline = self._last_probe or (None, None)
        opt.finish_step(
            grads, skipped, step=self._step, loss_plus=lp, loss_minus=lm, probe=probe, baseline=baseline
        )
        if not skipped:
            self._log_g.append(opt.last_step.projected_grad)
            self._log_lp.append(lp)
            self._log_lm.append(lm)
        self._reset_step()
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.optimizer is None:
            return control
        extra: dict[str, float] = {}
        if self._log_g:
            extra["projected_grad"] = sum(self._log_g) / len(self._log_g)
            extra["loss_plus"] = sum(self._log_lp) / len(self._log_lp)
            extra["loss_minus"] = sum(self._log_lm) / len(self._log_lm)
        extra["zo_skipped_steps"] = self.optimizer.skipped_steps
        if self.config.clip_projected_grad is not None:
            extra["zo_clipped_steps"] = self.optimizer.clipped_steps
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1].update(extra)
        self._reset_log()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall_forward()
        if self.optimizer is not None:
            self.optimizer.close()
        return control

    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "process_index", 0) == 0 and args.output_dir:
            quarantine_incomplete_checkpoints(args.output_dir)
        return control

    def on_save(self, args, state, control, **kwargs):
        # the checkpoint and the trajectory log must agree after a crash: sync the log now
        if self.optimizer is not None and self.optimizer._trajectory is not None:
            self.optimizer._trajectory.sync()
        return control

    # ------------------------------------------------------------------ forward wrapping
    def _install_forward(self, model: nn.Module) -> None:
        self._uninstall_forward()
        self._had_forward = "forward" in model.__dict__
        self._old_forward = model.__dict__.get("forward")
        orig = model.forward  # the instance attribute (accelerate's autocast) or the method

        def zo_forward(*args: Any, **kwargs: Any) -> Any:
            if not (model.training and torch.is_grad_enabled()):
                return orig(*args, **kwargs)
            holder: dict[str, Any] = {}

            def closure() -> torch.Tensor:
                holder.pop("out", None)  # drop the previous forward's outputs first
                if self.objective is not None:  # a non-differentiable objective replaces the loss
                    holder["out"] = {}
                    batch = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
                    return self.objective(model, batch)
                out = orig(*args, **kwargs)
                holder["out"] = out
                return _extract_loss(out)

            loss = self.zo_loss(closure)
            out = holder["out"]
            if isinstance(out, dict):
                out["loss"] = loss
            elif isinstance(out, tuple):
                out = (loss, *out[1:])
            else:
                out = loss
            return out

        zo_forward.__zo_wrapper__ = True  # type: ignore[attr-defined]
        model.forward = zo_forward  # type: ignore[method-assign]
        self._model = model

    def _uninstall_forward(self) -> None:
        model = self._model
        if model is None or not getattr(model.__dict__.get("forward"), "__zo_wrapper__", False):
            return
        if self._had_forward:
            model.forward = self._old_forward  # type: ignore[method-assign]
        else:
            del model.forward
        self._old_forward = None

    # ------------------------------------------------------------------ the ZO loss
    def zo_loss(self, closure: Callable[[], Any]) -> torch.Tensor:
        """Run ``closure`` under the step's perturbations and return a loss tensor whose
        backward feeds the projected gradient into this step's accumulator."""
        if self.optimizer is None:
            raise RuntimeError("ZOCallback is not set up: on_train_begin has not run.")
        est = self.optimizer.estimate(closure, step=self._step)
        if self.config.optimizer == "zo-sgd-conservative":
            self._last_probe = (closure, est.loss)  # the last micro-batch probes the update
        device = next(iter(self.optimizer.specs())).param.device
        leaf = torch.tensor(est.loss, dtype=torch.float32, device=device, requires_grad=True)
        leaf.register_hook(lambda grad, est=est: self._accumulate(float(grad), est))
        return leaf.clone()

    def _accumulate(self, factor: float, est: ZOEstimate) -> None:
        if self._scaler is not None:
            factor /= float(self._scaler.get_scale())
        if est.skipped:
            self._skip = True
            return
        if self._acc is None:
            self._acc = [0.0] * len(est.projected_grads)
        for i, g in enumerate(est.projected_grads):
            self._acc[i] += factor * g
        # factor-weighted, like the gradient: the step's loss as the Trainer defines it
        self._lp.append(factor * est.losses_plus[-1])
        self._lm.append(factor * est.losses_minus[-1])


def quarantine_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Rename ``checkpoint-N`` folders whose ``trainer_state.json`` (the file the Trainer
    writes last) is missing or unreadable to ``incomplete-checkpoint-N``, so
    ``resume_from_checkpoint=True`` never picks a checkpoint whose write was interrupted."""
    moved = []
    root = Path(output_dir)
    if not root.is_dir():
        return moved
    for ckpt in sorted(root.glob("checkpoint-*")):
        if not ckpt.is_dir():
            continue
        state = ckpt / "trainer_state.json"
        try:
            json.loads(state.read_text())
            continue
        except (OSError, ValueError):
            pass
        target = ckpt.with_name("incomplete-" + ckpt.name)
        n = 1
        while target.exists():
            target = ckpt.with_name(f"incomplete-{n}-{ckpt.name}")
            n += 1
        ckpt.rename(target)
        logger.warning("Checkpoint %s was not completely written; moved it to %s.", ckpt, target)
        moved.append(target)
    return moved


class ZOTrainerMixin:
    """Mixin for a ``transformers.Trainer`` (sub)class: ZO wraps ``compute_loss`` instead of
    the model's forward, which serves ``label_smoothing_factor`` and ``compute_loss_func``."""

    def _zo_callback(self) -> ZOCallback:
        for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, ZOCallback):
                return cb
        raise RuntimeError("ZOTrainerMixin: no ZOCallback among the Trainer's callbacks.")

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        holder: dict[str, Any] = {}

        def closure() -> torch.Tensor:
            holder.pop("out", None)
            res = super(ZOTrainerMixin, self).compute_loss(  # type: ignore[misc]
                model, dict(inputs), True, num_items_in_batch
            )
            holder["out"] = res[1]
            return res[0]

        loss = self._zo_callback().zo_loss(closure)
        return (loss, holder["out"]) if return_outputs else loss


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` with ZO through ``compute_loss``.

    ``ZOTrainer(model, args, ..., zo_config=ZOConfig(...) or dict)``; everything else as for
    ``Trainer``.  Use it where the pure callback cannot work (label smoothing,
    ``compute_loss_func``, a custom ``compute_loss``).
    """

    def __init__(self, *args: Any, zo_config: ZOConfig | dict[str, Any] | None = None, **kwargs: Any) -> None:
        cfg = zo_config.to_dict() if isinstance(zo_config, ZOConfig) else dict(zo_config or {})
        callbacks = list(kwargs.pop("callbacks", None) or [])
        zo = next((cb for cb in callbacks if isinstance(cb, ZOCallback)), None)
        if zo is None:
            zo = ZOCallback(**cfg)
            callbacks.append(zo)
        elif cfg:
            raise ValueError("Pass ZO settings either as zo_config or through the ZOCallback, not both.")
        zo._wrap_forward = False
        super().__init__(*args, callbacks=callbacks, **kwargs)
