"""Hugging Face ``transformers.Trainer`` integration: ``ZOCallback``, and ``ZOTrainer`` /
``zo_trainer(cls)`` for trainers whose loss is computed outside the model's forward.

How a callback alone replaces backprop in the stock Trainer (see docs/hf.md):

* ``on_train_begin`` builds the ZO optimizer from the Trainer's own (``integrations.driver``)
  and wraps the model's instance ``forward``.  The wrapper acts only when ``model.training and
  torch.is_grad_enabled()`` (so evaluation, prediction and ``generate`` run the real
  forward): it runs the perturbed forwards under ``no_grad`` and returns the outputs of the
  last one with ``loss`` replaced by ``leaf.clone()``, whose backward feeds the projected
  gradient into the step's accumulator.
* ``on_pre_optimizer_step`` all-reduces and applies the update with the ``lr`` and
  ``weight_decay`` of the Trainer's param groups; the stock ``optimizer.step()`` then finds no
  gradients.  The ZO optimizer's state rides in the Trainer's optimizer checkpoint
  (``param_groups[0]["zo_plugins"]``), so ``resume_from_checkpoint`` restores momentum
  buffers, Adam moments and counters with the Trainer's own files.
* The step seed comes from ``state.global_step``, so a resumed run continues the exact
  direction sequence.

Abort safety: the weights are never perturbed while the Trainer holds control (the ZO
optimizer's estimate returns with them restored).  The wrapper expects one training forward
per micro-batch, announced by ``on_step_begin`` / ``on_substep_end``; a training forward that
comes unannounced means the run that installed it ended without ``on_train_end`` (an
exception, an interrupt) and another loop is driving the model -- the wrapper then removes
itself and runs the real forward.  An exception inside the wrapper removes it too.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Callable, Sequence
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
from ..quant import resolve_quantized
from .driver import ZODriver

__all__ = [
    "ZOCallback",
    "ZOTrainer",
    "ZOTrainerMixin",
    "zo_trainer",
    "quarantine_incomplete_checkpoints",
    "allow_quantized_training",
]

logger = logging.getLogger("zo_plugins")
CHECKPOINT_KEY = "zo_plugins"
"""Key of the ZO optimizer's state in ``param_groups[0]`` of the Trainer's optimizer."""
_FALLBACK_HINT = (
    "Use zo_plugins.ZOTrainer (a Trainer subclass that wraps compute_loss) in place of "
    "Trainer(callbacks=[ZOCallback()]), or zo_plugins.zo_trainer(YourTrainerClass) for a Trainer subclass."
)
_TRL_HINT = (
    "TRL's trainers compute the loss outside the model's forward (SFTTrainer from "
    "`outputs.log_probs` of a fused LM head), which a forward wrapper cannot serve. Use "
    "zo_plugins.ZOSFTTrainer in place of trl.SFTTrainer (same arguments, plus zo_config=...), or "
    "zo_plugins.zo_trainer(OtherTrainer) for another TRL trainer."
)


def _extract_loss(outputs: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    loss = None
    if isinstance(outputs, dict):
        loss = outputs.get("loss")
    elif isinstance(outputs, (tuple, list)) and outputs:
        loss = outputs[0]
    elif isinstance(outputs, torch.Tensor):
        loss = outputs
    if loss is None:
        keys = sorted(k for k in kwargs if k != "num_items_in_batch")
        if "labels" not in kwargs:
            raise RuntimeError(
                f"ZOCallback: the model returned no loss because the batch has no `labels` (its keys: {keys}). "
                "Give the dataset a labels column, or use a data collator that adds one (e.g. "
                "DataCollatorForLanguageModeling(tokenizer, mlm=False) for causal LM). If your Trainer "
                "computes the loss itself (compute_loss_func, a compute_loss override), " + _FALLBACK_HINT
            )
        raise RuntimeError(
            f"ZOCallback: the model was given `labels` but returned no loss (batch keys: {keys}); ZO needs the "
            "loss from the forward. " + _FALLBACK_HINT
        )
    return loss


def _is_trl(args: Any) -> bool:
    return type(args).__module__.split(".")[0] == "trl"


class ZOCallback(TrainerCallback):
    """Zeroth-order training in the stock ``transformers.Trainer``.

    ``Trainer(model, args, ..., callbacks=[ZOCallback(eps=1e-3, seed=0)])``.  Accepts every
    ``ZOConfig`` field as a keyword.  The learning rate, scheduler, weight decay groups,
    gradient accumulation, evaluation, saving and resuming are the Trainer's own.

    ``objective=fn`` replaces the loss by ``fn(model, batch)`` (any scalar: an accuracy, an
    F1 of generated text, a reward); with ``maximize=True`` it is maximised.  Inside ``fn``,
    calling the model runs its real forward on the perturbed weights.  With
    ``estimator='rank'`` and ``ranking_oracle=fn(outputs) -> indices best first``, ``objective``
    may return anything the oracle ranks (generated text, for instance).  ``mask_fn`` is
    ``ZOOptimizer``'s.

    Logs ``projected_grad``, ``loss_plus``, ``loss_minus`` (means since the last log) and the
    ``zo_skipped_steps`` / ``zo_clipped_steps`` / ``zo_rejected_steps`` counters; the
    Trainer's ``grad_norm`` entry (0 under ZO: there is no ``.grad``) is replaced by the norm
    of the ZO gradient estimate.
    """

    def __init__(
        self,
        objective: Callable[[nn.Module, dict[str, Any]], Any] | None = None,
        *,
        ranking_oracle: Callable[[list[Any]], Sequence[int]] | None = None,
        mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None = None,
        **zo_config_fields: Any,
    ) -> None:
        self.config = ZOConfig(**zo_config_fields)
        if objective is not None and not callable(objective):
            raise ValueError(
                f"ZOCallback(objective=...) must be callable (model, batch) -> scalar, not {objective!r}."
            )
        if ranking_oracle is not None and not callable(ranking_oracle):
            raise ValueError(f"ZOCallback(ranking_oracle=...) must be callable, not {ranking_oracle!r}.")
        self.objective = objective
        self.driver = ZODriver(
            self.config, owner="ZOCallback", ranking_oracle=ranking_oracle, mask_fn=mask_fn
        )
        self._model: nn.Module | None = None
        self._had_forward = False
        self._old_forward: Any = None
        self._wrap_forward = True  # ZOTrainer turns this off and calls zo_loss itself
        self._inner_optimizer: Any = None
        self._scaler: Any = None
        self._step = 0
        self._expect_forward = False
        self._reset_log()

    @property
    def optimizer(self):
        """The ``ZOOptimizer`` of the current run (None before training starts)."""
        return self.driver.optimizer

    def _reset_log(self) -> None:
        self._log: dict[str, list[float]] = {}

    # ------------------------------------------------------------------ events
    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "process_index", 0) == 0 and args.output_dir:
            quarantine_incomplete_checkpoints(args.output_dir)
        return control

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self._wrap_forward and getattr(args, "label_smoothing_factor", 0) > 0:
            raise ValueError(
                f"ZOCallback cannot serve label_smoothing_factor={args.label_smoothing_factor}: "
                "the Trainer pops the labels before the forward. " + _FALLBACK_HINT
            )
        if self._wrap_forward and _is_trl(args):
            raise ValueError(f"ZOCallback cannot train through {type(args).__name__} alone: " + _TRL_HINT)
        if model is None or optimizer is None:
            raise RuntimeError("ZOCallback.on_train_begin needs the model and optimizer from the Trainer.")
        if self.config.perturbation_parallel:
            _check_pair_sharded(kwargs.get("train_dataloader"))
        self._uninstall_forward()  # a previous run that ended without on_train_end
        self.driver.abort()
        self._model = model
        self._inner_optimizer = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
        self.driver.build(optimizer, model)
        saved = self._inner_optimizer.param_groups[0].pop(CHECKPOINT_KEY, None)
        if saved is not None and state.global_step > 0:  # resume_from_checkpoint loaded optimizer.pt
            self.driver.load_state_dict(saved)
            if self.optimizer.step_count != state.global_step:
                raise ValueError(
                    f"ZOCallback: the checkpoint's ZO state is at step {self.optimizer.step_count} but the "
                    f"Trainer resumes at step {state.global_step}; resume from a checkpoint written by the "
                    "same run (its optimizer.pt and trainer_state.json belong together)."
                )
        elif state.global_step > 0:
            logger.warning(
                "ZOCallback: resuming at step %d from a checkpoint without ZO state (written by an older "
                "zo_plugins?): the directions continue exactly, but optimizer=%r's state and the "
                "skipped/clipped counters start afresh.",
                state.global_step,
                self.config.optimizer,
            )
        scaler = getattr(optimizer, "scaler", None)
        if scaler is not None:
            # fp16 GradScaler: its step() asserts when no inf checks were recorded. Detach it
            # from the optimizer and divide the factor the hook receives by its scale.
            self._scaler, optimizer.scaler = scaler, None
            self.driver.loss_scale = lambda: float(self._scaler.get_scale())
        self._stash_state()
        if self._wrap_forward:
            self._install_forward(model, args)
        self._expect_forward = False
        return control

    def on_step_begin(self, args, state, control, **kwargs):
        self.driver.reset_step()
        self._step = state.global_step
        self._expect_forward = True
        if self.driver.optimizer is not None:
            self.driver.sync(self._inner_optimizer)
        return control

    def on_substep_end(self, args, state, control, **kwargs):
        self._expect_forward = True
        return control

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.driver.optimizer is None:
            return control
        self._expect_forward = False
        if not self.driver.has_estimates:
            raise RuntimeError(
                "ZOCallback saw no training forward in this optimizer step: the Trainer called "
                "the model without going through its `forward` attribute. " + _FALLBACK_HINT
            )
        metrics = self.driver.finish(self._step, self._inner_optimizer)
        for k, v in metrics.items():
            self._log.setdefault(k, []).append(v)
        self._stash_state()
        return control

    def _stash_state(self) -> None:
        """Put the ZO optimizer's state where the Trainer's checkpoint will save it: the
        Trainer's optimizer ``param_groups[0]`` (torch saves and reloads extra group keys)."""
        self._inner_optimizer.param_groups[0][CHECKPOINT_KEY] = self.driver.state_dict()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or self.optimizer is None:
            return control
        extra: dict[str, float] = {}
        for key in ("projected_grad", "loss_plus", "loss_minus", "zo_grad_norm"):
            vals = self._log.get(key, [])
            if vals:
                extra[key] = sum(vals) / len(vals)
        extra["zo_skipped_steps"] = self.optimizer.skipped_steps
        if self.config.clip_projected_grad is not None:
            extra["zo_clipped_steps"] = self.optimizer.clipped_steps
        if self.optimizer.rule.accept is not None:
            extra["zo_rejected_steps"] = self.optimizer.rejected_steps
        if "grad_norm" in logs:  # 0 from clip_grad_norm_ over absent .grad: report ZO's estimate instead
            grad_norm = extra.pop("zo_grad_norm", None)
            if grad_norm is None:
                del logs["grad_norm"]
            else:
                logs["grad_norm"] = grad_norm
        extra.pop("zo_grad_norm", None)
        logs.update(extra)
        if state.log_history and state.log_history[-1].get("loss") == logs.get("loss"):
            state.log_history[-1].update(extra)
            if "grad_norm" in state.log_history[-1]:
                if "grad_norm" in logs:
                    state.log_history[-1]["grad_norm"] = logs["grad_norm"]
                else:
                    del state.log_history[-1]["grad_norm"]
        self._reset_log()
        return control

    def on_step_end(self, args, state, control, **kwargs):
        # offloaded blocks receive a step's update when they are next visited: apply it now if
        # the Trainer is about to read the weights outside a forward (a checkpoint)
        if self.optimizer is not None and self.optimizer.offload is not None:
            if control.should_save or state.global_step >= state.max_steps > 0:
                self.optimizer.flush()
                self._stash_state()  # the checkpoint's ZO state must not list the applied updates
        return control

    def on_save(self, args, state, control, **kwargs):
        # the checkpoint and the trajectory log must agree after a crash: sync the log now
        if self.optimizer is not None:
            self.optimizer.sync_trajectory()
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self._uninstall_forward()
        if self.optimizer is not None:
            self.optimizer.close()
            if self._inner_optimizer is not None:
                self._inner_optimizer.param_groups[0].pop(CHECKPOINT_KEY, None)
        return control

    def abort(self) -> None:
        """End a run that will not reach ``on_train_end``: the forward is restored, the
        half-accumulated step dropped (the weights are already unperturbed)."""
        self._uninstall_forward()
        self.driver.abort()
        self._expect_forward = False

    # ------------------------------------------------------------------ forward wrapping
    def _install_forward(self, model: nn.Module, train_args: Any = None) -> None:
        self._uninstall_forward()
        self._had_forward = "forward" in model.__dict__
        self._old_forward = model.__dict__.get("forward")
        orig = model.forward  # the instance attribute (accelerate's autocast) or the method
        probe_forward = orig
        if getattr(train_args, "torch_compile", False):
            if self.optimizer.perturbation_mode == "in-place":
                # in place the parameters stay the same tensors, so the compiled graph is reused
                probe_forward = torch.compile(
                    orig,
                    backend=train_args.torch_compile_backend or "inductor",
                    mode=train_args.torch_compile_mode,
                )
            else:
                logger.info(
                    "ZOCallback: torch_compile=True: the ZO probes run eagerly (out-of-place perturbation "
                    "hands each module new tensors, which a compiled graph would recompile for); "
                    "perturbation='in-place' runs them through the compiled forward."
                )

        # functools.wraps: the Trainer reads the forward's signature to keep the dataset columns
        @torch.compiler.disable
        @functools.wraps(orig)
        def zo_forward(*args: Any, **kwargs: Any) -> Any:
            if not (model.training and torch.is_grad_enabled()):
                return orig(*args, **kwargs)
            if not self._expect_forward:
                logger.warning(
                    "ZOCallback: a training forward arrived outside the Trainer step that installed the ZO "
                    "wrapper (that run ended without on_train_end, e.g. after an exception); the wrapper "
                    "removed itself and the real forward runs."
                )
                self.abort()
                return orig(*args, **kwargs)
            if kwargs.get("fused_lm_head"):
                self.abort()
                raise RuntimeError("ZOCallback: " + _TRL_HINT)
            self._expect_forward = False
            holder: dict[str, Any] = {}

            def closure() -> Any:
                holder.pop("out", None)  # drop the previous forward's outputs first
                if self.objective is not None:  # a non-differentiable objective replaces the loss
                    holder["out"] = {}
                    batch = {k: v for k, v in kwargs.items() if k != "num_items_in_batch"}
                    return self.objective(model, batch)
                out = probe_forward(*args, **kwargs)
                holder["out"] = out
                return _extract_loss(out, kwargs)

            try:
                loss = self.zo_loss(closure)
            except BaseException:
                self.abort()
                raise
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
        opt = self.driver._require()
        device = opt.specs()[0].param.device
        est, loss = self.driver.micro_batch(closure, self._step, device)
        self.last_estimate = est
        return loss


def _check_pair_sharded(loader: Any) -> None:
    from ..distributed import PAIR_SHARDED

    if loader is not None and not getattr(loader, PAIR_SHARDED, False):
        raise ValueError(
            "ZOCallback(perturbation_parallel=True): both ranks of a pair must read the same batches, but the "
            "Trainer's training loader is sharded per rank, and the Trainer sizes its epochs from that loader "
            "before any callback runs. Use zo_plugins.ZOTrainer(..., zo_config={'perturbation_parallel': True}) "
            "(or zo_trainer(YourTrainer)), which shards the loader per pair when it is built."
        )


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


@contextlib.contextmanager
def allow_quantized_training(model: Any, config: ZOConfig):
    """Let ``Trainer.__init__`` accept ``model`` when ZO trains its quantization scales.

    The stock Trainer refuses a quantized model without adapters in its constructor
    (transformers 5.24: ``Trainer.__init__`` calls ``trainer_utils.validate_quantization_for_training``,
    "You cannot perform fine-tuning on purely quantized models"), before any callback runs, because
    backprop cannot update integer weights.  ZO with ``quantized='scales'`` never back-propagates
    and updates only the continuous scales, so for the duration of the constructor that one check
    is skipped for this model (every other model, and every other check, is unchanged).  Used by
    ``ZOTrainer`` and ``zo_trainer(cls)``."""
    if model is None or not isinstance(model, nn.Module) or getattr(model, "hf_quantizer", None) is None:
        yield
        return
    if resolve_quantized(model, config.quantized) != "scales":
        yield
        return
    import transformers.trainer as trainer_module

    original = getattr(trainer_module, "validate_quantization_for_training", None)
    if original is None:  # another transformers layout: its own check decides
        yield
        return

    def validate(m: Any) -> None:
        if m is not model:
            original(m)

    trainer_module.validate_quantization_for_training = validate
    try:
        yield
    finally:
        trainer_module.validate_quantization_for_training = original


class ZOTrainerMixin:
    """Mixin for a ``transformers.Trainer`` (sub)class: ZO wraps ``compute_loss`` instead of
    the model's forward, which serves ``label_smoothing_factor``, ``compute_loss_func``, a
    custom ``compute_loss`` and trainers that build the loss outside the forward (TRL)."""

    def _zo_callback(self) -> ZOCallback:
        for cb in self.callback_handler.callbacks:  # type: ignore[attr-defined]
            if isinstance(cb, ZOCallback):
                return cb
        raise RuntimeError("ZOTrainerMixin: no ZOCallback among the Trainer's callbacks.")

    def _zo_init(self, args: tuple, kwargs: dict[str, Any]) -> contextlib.AbstractContextManager:
        """Shared constructor logic: ``zo_config=`` (a ZOConfig or dict) or a ZOCallback in
        ``callbacks``; the callback is switched to compute_loss mode.  Returns the context the
        Trainer's ``__init__`` runs in (``allow_quantized_training``)."""
        zo_config = kwargs.pop("zo_config", None)
        cfg = zo_config.to_dict() if isinstance(zo_config, ZOConfig) else dict(zo_config or {})
        callbacks = list(kwargs.pop("callbacks", None) or [])
        zo = next((cb for cb in callbacks if isinstance(cb, ZOCallback)), None)
        if zo is None:
            zo = ZOCallback(**cfg)
            callbacks.append(zo)
        elif cfg:
            raise ValueError("Pass ZO settings either as zo_config or through the ZOCallback, not both.")
        zo._wrap_forward = False
        kwargs["callbacks"] = callbacks
        return allow_quantized_training(kwargs.get("model", args[0] if args else None), zo.config)

    def get_train_dataloader(self):
        loader = super().get_train_dataloader()  # type: ignore[misc]
        if self._zo_callback().config.perturbation_parallel:  # both ranks of a pair read the same batches
            from ..distributed import shard_dataloader_per_pair

            shard_dataloader_per_pair(loader)
        return loader

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        holder: dict[str, Any] = {}

        def closure() -> torch.Tensor:
            holder.pop("out", None)
            res = super(ZOTrainerMixin, self).compute_loss(  # type: ignore[misc]
                model, dict(inputs), return_outputs, num_items_in_batch
            )
            if return_outputs:
                holder["out"] = res[1]
                return res[0]
            return res

        loss = self._zo_callback().zo_loss(closure)
        return (loss, holder["out"]) if return_outputs else loss

    def train(self, *args: Any, **kwargs: Any):
        try:
            return super().train(*args, **kwargs)  # type: ignore[misc]
        except BaseException:
            self._zo_callback().abort()
            raise


class ZOTrainer(ZOTrainerMixin, Trainer):
    """``transformers.Trainer`` with ZO through ``compute_loss``.

    ``ZOTrainer(model, args, ..., zo_config=ZOConfig(...) or dict)``; everything else as for
    ``Trainer``.  Use it where the pure callback cannot work (label smoothing,
    ``compute_loss_func``, a custom ``compute_loss``).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with self._zo_init(args, kwargs):
            super().__init__(*args, **kwargs)


_ZO_CLASSES: dict[type, type] = {}


def zo_trainer(trainer_class: type) -> type:
    """A ZO version of any ``transformers.Trainer`` subclass (TRL's trainers, your own): the
    class with ``ZOTrainerMixin`` in front, taking ``zo_config=`` like ``ZOTrainer``.
    ``zo_trainer(trl.DPOTrainer)(model=..., args=..., zo_config={"eps": 1e-3})``."""
    if not (isinstance(trainer_class, type) and issubclass(trainer_class, Trainer)):
        raise TypeError(f"zo_trainer needs a transformers.Trainer subclass, not {trainer_class!r}.")
    if issubclass(trainer_class, ZOTrainerMixin):
        return trainer_class
    if trainer_class not in _ZO_CLASSES:

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            with self._zo_init(args, kwargs):
                trainer_class.__init__(self, *args, **kwargs)

        _ZO_CLASSES[trainer_class] = type(
            f"ZO{trainer_class.__name__}",
            (ZOTrainerMixin, trainer_class),
            {"__init__": __init__, "__module__": __name__, "__doc__": zo_trainer.__doc__},
        )
    return _ZO_CLASSES[trainer_class]
