"""``ZOOptimizer``: the ``torch.optim`` face of the zeroth-order core.

``step(closure)`` runs ``closure()`` (a no-grad forward returning the loss) under the step's
perturbations through the configured estimator, forms the projected gradient(s) and applies
the configured update rule with each param group's ``lr`` and ``weight_decay`` (so LR
schedulers work unchanged).

The pieces it orchestrates live in their own modules: the step plan (``plan``), the
estimators and update rules (registries in ``estimators`` and ``updates``), the perturbation
modes (``perturbation``), backend dispatch (``backend``), the schedule and the updates left to
offloaded blocks (``schedule``), the update norms and divergence warnings (``watch``), the
trajectory recorder (``recorder``) and the one collective (``distributed``).

Integrations (the HF callback, the Lightning strategies; ``integrations/driver.py``) use the
two halves separately: ``estimate(closure, step=t)`` once per micro-batch -- the weights are
unperturbed when it returns -- then ``finish_step(grads, ...)`` once per optimizer step.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from ..quant import QuantizedSet
from .backend import TORCH_PASSES, Passes, passes_for_masks, select_backend
from .distributed import all_reduce_projected_grads, check_launch
from .estimators import Probe, ZOEstimate, as_float_loss, cge_coordinates, get_estimator
from .interrupts import deferred_interrupts
from .noise import PHILOX_GAUSSIAN, STREAM_VERSION
from .pairs import PairParallel
from .params import build_blocks, build_group_specs, model_names, model_order, resolve_modes
from .passes import ParamSpec
from .perturbation import direction_tensor
from .plan import StepPlan, make_plan, step_seeds
from .recorder import Recorder
from .schedule import Deferred, resolve_schedule
from .sharding import check_sharded_config, localize_specs, make_perturber, prepare_model
from .trajectory import FORMAT, VERSION, weights_hash
from .updates import get_update_rule, init_state
from .watch import StepWatch

__all__ = ["ZOOptimizer", "ZOStepInfo", "ZOEstimate", "materialize_direction"]

logger = logging.getLogger("zo_plugins")


@dataclass
class ZOStepInfo:
    """``ZOOptimizer.last_step``: what the last optimizer step did."""

    step: int = -1
    step_seed: int = 0
    projected_grad: float = float("nan")
    """Mean over directions of the projected gradient actually applied (after all-reduce)."""
    loss_plus: float = float("nan")
    loss_minus: float = float("nan")
    skipped: bool = False
    """True if the step was skipped because a loss was NaN/inf (weights left untouched)."""
    projected_grads: list[float] = field(default_factory=list)
    clipped: bool = False
    """True if ``clip_projected_grad`` clipped this step's projected gradient."""
    rejected: bool = False
    """True if 'zo-sgd-conservative' rejected the update (the loss would have got worse)."""
    grad_norm: float = float("nan")
    """Norm of the step's gradient estimate ``d = mean_q g_q z_q`` over the D perturbed
    coordinates, ``sqrt(sum_q (g_q / n)^2 * D)``: exact for one Rademacher direction, the
    expectation for Gaussian ones.  What the Trainer's ``grad_norm`` log entry reports."""
    update_norm: float = float("nan")
    """Norm of the applied update (``lr * grad_norm`` for ZO-SGD; ``lr * sqrt(D)`` for sign
    and Adam), the quantity the learning-rate warning compares with the weights' norm."""


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO/SPSA) and its family as a ``torch.optim.Optimizer``.

    Args:
        params: an ``nn.Module`` (its trainable parameters; noise keys come from parameter
            names and embedding padding rows are frozen), an iterable of tensors, or an
            iterable of param-group dicts.
        lr: learning rate of the update.
        eps: perturbation scale.
        weight_decay: L2 decay, ``theta <- theta - lr * wd * theta``.
        seed: base seed of the direction stream.
        model: the module that owns ``params`` when ``params`` are tensors or groups; gives
            stable names, padding rows, out-of-place perturbation and dropout="eval".
        ranking_oracle: for ``estimator='rank'``: a callable receiving the closure's outputs
            for the ``n_queries`` candidates (any objects: generated text, images) and
            returning their indices best first (a human, a reward model); by default
            candidates are ranked by the closure's scalar.
        mask_fn: a user sparsity mask: ``mask_fn(name, param, step)`` returns a bool tensor
            of ``param``'s shape (True = perturbed and updated) or None for dense; called
            once per step.  With in-place perturbation it must not depend on the weights'
            values (they are perturbed between passes).  Recorded in a trajectory by name;
            ``replay`` needs the same function.
        **zo_config_fields: any other ``ZOConfig`` field (``n_queries``, ``distribution``,
            ``dropout``, ``perturbation``, ...).
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        seed: int = 0,
        *,
        model: nn.Module | None = None,
        ranking_oracle: Callable[[list[Any]], Sequence[int]] | None = None,
        mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None = None,
        **zo_config_fields: Any,
    ) -> None:
        unknown = set(zo_config_fields) - set(ZOConfig.field_names())
        if unknown:
            raise TypeError(
                f"ZOOptimizer got unknown argument(s) {sorted(unknown)}; valid ZOConfig fields "
                f"are {list(ZOConfig.field_names())}."
            )
        self.config = cfg = ZOConfig(eps=eps, seed=seed, **zo_config_fields)
        _check_hyper("lr", lr)
        _check_hyper("weight_decay", weight_decay)
        if ranking_oracle is not None and not callable(ranking_oracle):
            raise ValueError(f"ranking_oracle must be callable (outputs) -> indices, not {ranking_oracle!r}.")
        if cfg.batched_copies and model is None and not isinstance(params, nn.Module):
            raise ValueError(
                "batched_copies=True needs the model (its modules evaluate the copies): pass the "
                "nn.Module, ZOOptimizer(model, ...), or model=."
            )
        if mask_fn is not None and not callable(mask_fn):
            raise ValueError(f"mask_fn must be callable (name, param, step) -> bool tensor, not {mask_fn!r}.")
        from_module = isinstance(params, nn.Module)
        if from_module:
            model = params
        prepare_model(model)  # FSDP2: reshard the groups a forward left gathered; refuse FSDP1
        if isinstance(params, nn.Module):
            params = [p for p in params.parameters() if p.requires_grad]
        # quantized layers (zo_plugins.quant): their scales are tensors with names and carriers
        self._quantized = QuantizedSet(model, cfg.quantized)
        if from_module and self._quantized.mode == "scales":
            params = self._quantized.tensors()
        params = list(params)
        if not params:
            raise ValueError(
                "ZOOptimizer got no parameters: pass a model with trainable parameters "
                "(requires_grad=True) or a non-empty list of tensors."
            )
        self.model = model
        self._pair = PairParallel(cfg) if cfg.perturbation_parallel else None  # core.pairs
        self.estimator = get_estimator(cfg.estimator) if self._pair is None else self._pair.estimator
        self.rule = get_update_rule(cfg.optimizer)
        self.ranking_oracle = ranking_oracle
        self.mask_fn = mask_fn
        self._names, self._frozen_rows = model_names(model)
        self._names.update(self._quantized.names())
        self._seen: set[int] = set()
        self._specs: list[list[ParamSpec]] = []
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))  # add_param_group builds specs
        _check_quantized(self.specs(), cfg)
        self._quantized.prepare()
        self._configure()
        self.perturber = make_perturber(model, cfg, self.specs(), on_shift=self._record_shift)
        self.schedule, self.offload = resolve_schedule(
            cfg, model, self.specs(), self._quantized, self.perturber
        )
        self._deferred = Deferred(
            self.offload, lambda: self._passes
        )  # offloaded tensors' updates (core.schedule)
        self._plan: StepPlan | None = None
        self._step = 0
        self._thresholds: dict[str, float] = {}  # sparsity_threshold='initial': h per tensor name
        self.skipped_steps = 0
        self.clipped_steps = 0
        self.rejected_steps = 0  # zo-sgd-conservative: updates not taken
        self._history: list[list[tuple[int, float]]] = []  # stateless momentum: recent terms
        self._recorder = Recorder(cfg.trajectory_path) if cfg.trajectory_path else None
        self._validated = not any(s.in_place for s in self.specs())  # out of place: nothing to protect
        self._watch = StepWatch()  # update norms, the divergence warnings (core.watch)
        self.last_step = ZOStepInfo()
        check_launch()

    # ------------------------------------------------------------------ setup
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group (``torch.optim`` semantics): its tensors are perturbed and updated
        from the next step on, with the group's own ``lr`` / ``weight_decay``."""
        super().add_param_group(param_group)
        gi = len(self.param_groups) - 1
        specs = build_group_specs(  # a sharded (FSDP2) tensor becomes its local shard: core.sharding
            self.param_groups[gi]["params"],
            gi,
            names=self._names,
            frozen=self._frozen_rows,
            seen=self._seen,
            has_model=self.model is not None,
        )
        specs = localize_specs(specs)
        for spec in specs:
            spec.carrier = self._quantized.carrier(spec.param)
        self._specs.append(specs)
        if hasattr(self, "perturber"):  # after __init__: a group added during training
            if self._recorder is not None:
                raise ValueError(
                    "add_param_group during a run that records a trajectory: a trajectory log records a "
                    "fixed trainable set. Add every group before the first step, or record without "
                    "trajectory_path."
                )
            self.restore()
            _check_quantized(specs, self.config)
            self._configure()
            self._plan = None

    def _configure(self) -> None:
        cfg = self.config
        unperturbed = self.estimator.unperturbed_weights or bool(
            cfg.sparsity and cfg.sparsity_mode == "magnitude"
        )
        self._mode = resolve_modes(self.specs(), cfg, self.model, unperturbed=unperturbed)
        # a rule that brings its own pass (HiZOO) runs on the PyTorch passes (ZOConfig refuses 'triton')
        requested = "torch" if self.rule.apply is not None and cfg.backend == "auto" else cfg.backend
        self.backend, self._passes, self.backend_reason = select_backend(requested, self.specs())
        if any(s.source is not None for s in self.specs()):  # FSDP2 shards (core.sharding)
            check_sharded_config(
                cfg, self.specs(), estimator=cfg.estimator, mask_fn=self.mask_fn, model=self.model
            )
            self.backend, self._passes = "torch", TORCH_PASSES
            self.backend_reason = (
                "sharded (FSDP2) parameters run on the PyTorch passes (global element offsets)"
            )
        self.stream = self._resolve_stream()
        self._ordered = model_order(self.specs(), self.model)
        self._blocks = build_blocks(self._ordered)

    def flush(self) -> None:
        """Apply the updates offloaded blocks have not received yet (they arrive with the next
        visit otherwise): before the weights are read outside a forward -- a checkpoint, an
        export.  A no-op without offload."""
        if self.offload is not None:
            self.offload.flush()

    def _resolve_stream(self) -> str:
        """The stream name the passes draw directions from (``core.noise.STREAMS``)."""
        cfg = self.config
        if cfg.distribution == "rademacher":
            return "rademacher"
        choice = cfg.gaussian_stream
        if choice == "auto":
            cuda = any(s.param.is_cuda for s in self.specs())
            choice = "philox" if self.backend == "triton" or cuda else "native"
        if choice == "native" and self.backend == "triton":
            raise ValueError(
                "gaussian_stream='native' cannot run on the Triton backend (the kernels draw the "
                "Philox stream): use gaussian_stream='philox' or 'auto', or backend='torch'."
            )
        return PHILOX_GAUSSIAN if choice == "philox" else "gaussian"

    def specs(self) -> list[ParamSpec]:
        return [s for g in self._specs for s in g]

    def active_specs(self) -> list[ParamSpec]:
        """The tensors the current step perturbs and updates (all of them unless ``block_wise``)."""
        return self.plan().active

    @property
    def perturbation_mode(self) -> str:
        """The resolved perturbation mode: 'in-place', 'out-of-place' or 'mixed'."""
        return self._mode

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (applied or skipped); the default step index of ``step``."""
        return self._step

    def seeds_for(self, step: int) -> list[int]:
        """Direction seeds of optimizer step ``step``, one per query."""
        return step_seeds(self.config, step)

    @property
    def grads_per_step(self) -> int:
        """Projected gradients one step produces (the estimator's; what is all-reduced)."""
        return self.estimator.grads_per_step(self.config)

    # ------------------------------------------------------------------ the step plan
    def plan(self, step: int | None = None) -> StepPlan:
        """The plan of step ``step`` (default: the current step), built once per step: seeds,
        active tensors, masks, sphere scales, passes.  Opening it for the first time also
        opens the trajectory log (before any weight changes)."""
        step = self._step if step is None else step
        if self._plan is None or self._plan.step != step:
            self._plan = self._make_plan(step)
            if self._recorder is not None and not self._recorder.is_open:
                self._recorder.open(self.trajectory_header(), step)
        return self._plan

    def _make_plan(self, step: int) -> StepPlan:
        plan = make_plan(
            step,
            config=self.config,
            specs=self._ordered,
            blocks=self._blocks,
            passes_for=lambda specs: passes_for_masks(self.backend, self._passes, specs),
            stream=self.stream,
            mask_fn=self.mask_fn,
            thresholds=self._thresholds,
        )
        scale = self.rule.direction_scale  # HiZOO: the probes of this step see H^-1/2 z
        for spec in self._ordered:
            spec.scale = None if scale is None else scale(self, spec)
        return plan

    def _record_shift(self, terms: list[tuple[int, float]]) -> None:
        if self._recorder is not None and self._plan is not None:
            self._recorder.shift([(self._plan.query_of(s), c) for s, c in terms])

    def restore(self) -> None:
        """Undo a pending in-place perturbation (no-op when none is pending)."""
        if self.perturber.pending:
            self.perturber.restore(self._plan)

    # ------------------------------------------------------------------ estimate
    def estimate(self, closure: Callable[[], Any], *, step: int | None = None) -> ZOEstimate:
        """Probe the closure around ``theta`` for step ``step`` with the configured estimator;
        ``projected_grads`` holds one coefficient per direction (per coordinate for 'cge').

        The weights are not updated, and they are unperturbed when this returns or raises
        (bit-identical out of place; in place, within an ulp): an integration can hand
        control back to its framework between micro-batches without leaving them perturbed.
        A NaN/inf loss ends the probe early and marks the estimate skipped."""
        est = self._estimate(closure, step)
        self.restore()
        return est

    def _estimate(self, closure: Callable[[], Any], step: int | None) -> ZOEstimate:
        """``estimate`` that leaves an in-place perturbation pending, for ``step`` to fuse its
        undo into the update pass."""
        step = self._step if step is None else step
        if not self._validated:
            self._validate_closure(closure)
        plan = self.plan(step)
        est = ZOEstimate(step, plan.seeds[0], [], [], [], False)

        def counted(*copies: int) -> Any:  # batched_copies: closure(copies)
            est.calls += 1
            return closure(*copies)

        probe = Probe(
            counted,
            plan,
            self.perturber,
            self.config,
            est,
            self.perturber.rng(self.specs()),
            model=self.model,
            ranking_oracle=self.ranking_oracle,
        )
        try:
            with torch.no_grad(), self.perturber.forward_mode():
                self.estimator.probe(probe)
        except BaseException:
            self.restore()  # a closure that raised never leaves the weights perturbed
            raise
        if est.skipped:
            self.restore()
        return est

    def _validate_closure(self, closure: Callable[[], Any]) -> None:
        """Run the closure once on the unperturbed weights before the first in-place
        perturbation, so a closure that fails or returns something unusable is reported while
        every weight is still untouched.  The RNG is forked, so the check shifts no dropout
        stream.  (Out of place the weights are never written: no check is needed.)"""
        cuda = sorted({s.param.device.index or 0 for s in self.specs() if s.param.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), self.perturber.forward_mode():
            out = closure()
            if self.ranking_oracle is None:
                as_float_loss(out)
        self._validated = True

    def probe_loss(self, plan: StepPlan, terms: list[tuple[int, float]], probe: Callable[[], Any]) -> float:
        """The loss ``probe()`` returns at ``theta + sum(terms)``, without consuming the RNG
        (used by 'zo-sgd-conservative' to test a candidate update)."""
        cuda = sorted({s.param.device.index or 0 for s in self.specs() if s.param.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), self.perturber.forward_mode():
            with self.perturber.perturbed(plan, terms):
                return as_float_loss(probe())

    # ------------------------------------------------------------------ update
    def apply_update(self, projected_grads: Sequence[float], *, step: int | None = None) -> None:
        """Apply the configured update rule for step ``step`` (default: the current step)
        along ``d = mean_q g_q z_q`` with each group's ``lr`` and ``weight_decay``; fuses the
        undo of a pending in-place perturbation into the same pass; advances the step."""
        step = self._step if step is None else step
        plan = self.plan(step)
        expected = self.grads_per_step
        if len(projected_grads) != expected:
            raise ValueError(
                f"apply_update got {len(projected_grads)} projected gradients; this configuration "
                f"(estimator={self.config.estimator!r}) makes {expected} per step."
            )
        if not all(math.isfinite(g) for g in projected_grads):
            raise ValueError(f"Non-finite projected gradient {list(projected_grads)}; skip the step instead.")
        groups = []
        active = {id(sp) for sp in plan.active}
        for group, gspecs in zip(self.param_groups, self._specs):
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            _check_hyper("lr", lr)
            _check_hyper("weight_decay", wd)
            groups.append((lr, wd, [sp for sp in gspecs if id(sp) in active]))
        with deferred_interrupts():
            if self.estimator.coordinate_update:
                self.perturber.restore(plan)
                self._apply_coordinates(plan, projected_grads)
            else:
                self._apply_directions(plan, projected_grads, self.perturber.take_pending(), groups)
        self._step = step + 1

    def _direction_terms(self, plan: StepPlan, projected_grads: Sequence[float]) -> list[tuple[int, float]]:
        """The estimated gradient of this step as (seed, coefficient) terms; with stateless
        momentum, the beta-weighted terms of the last ``momentum_history`` steps too."""
        terms = plan.terms([g / len(plan.seeds) for g in projected_grads])
        cfg = self.config
        if cfg.optimizer == "zo-sgd-momentum" and cfg.momentum_history > 0:
            self._history.append(terms)
            del self._history[: -cfg.momentum_history]
            terms = [
                (s, c * cfg.momentum**age)
                for age, past in enumerate(reversed(self._history))
                for s, c in past
            ]
        return terms

    def _apply_directions(self, plan: StepPlan, projected_grads, restore, groups) -> None:
        cfg = self.config
        if self.rule.apply is not None:  # a rule with its own pass (HiZOO)
            self._watch.clear()
            self.rule.apply(self, plan, projected_grads, restore, groups)
            return
        terms = self._direction_terms(plan, projected_grads)
        rule = self.rule.pass_rule(cfg)
        self._watch.note_update(
            plan, terms, rule, groups, projected_grads, self.specs(), self.offload, self.config.chunk_size
        )
        passes: Passes = plan.passes
        for lr, wd, specs in groups:
            if not specs:
                continue
            if rule is None:
                update = [(s, -lr * c) for s, c in terms if lr * c != 0.0]
                kw = dict(decay=lr * wd, distribution=plan.stream, chunk_size=plan.chunk_size)
                if self.offload is not None:  # offloaded blocks: applied when each next arrives
                    resident = [sp for sp in specs if not self.offload.owns(sp)]
                    for sp in specs:
                        if self.offload.owns(sp) and (update or kw["decay"]):
                            self._deferred.add(sp, dict(kw, update=update, round_seed=plan.round_seed))
                    specs = resident
                passes.update_group(specs, restore=restore, update=update, round_seed=plan.round_seed, **kw)
                continue
            states, steps = [], []
            for spec in specs:
                state = self.state[spec.param if spec.source is None else spec.source]
                if not state:
                    state.update(init_state(rule, spec.param))
                    state["step"] = 0
                state["step"] += 1
                states.append({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
                steps.append(state["step"])
            passes.rule_group(
                specs,
                rule=rule,
                restore=restore,
                grads=terms,
                lr=lr,
                weight_decay=wd,
                states=states,
                steps=steps,
                momentum=cfg.momentum,
                betas=cfg.betas,
                adam_eps=cfg.adam_eps,
                distribution=plan.stream,
                chunk_size=plan.chunk_size,
                round_seed=plan.round_seed,
            )

    def _apply_coordinates(self, plan: StepPlan, projected_grads: Sequence[float]) -> None:
        group_of = {id(sp): g for g, gspecs in zip(self.param_groups, self._specs) for sp in gspecs}
        with torch.no_grad():
            for (spec, i), g in zip(cge_coordinates(plan, self.config), projected_grads):
                group = group_of[id(spec)]
                lr, wd = float(group["lr"]), float(group["weight_decay"])
                if g == 0.0 and wd == 0.0:
                    continue
                flat = spec.param.data.view(-1)
                x = flat[i].double()
                flat[i] = (x - lr * (g + wd * x)).to(flat.dtype)

    def skip(self, *, step: int | None = None) -> None:
        """Skip step ``step``: restore any pending perturbation, count it, advance the step."""
        self.restore()
        self.skipped_steps += 1
        self._step = (self._step if step is None else step) + 1

    # ------------------------------------------------------------------ the whole step
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One ZO step: the estimator's forwards through ``closure``, then the update.

        Returns the mean probed loss as a tensor (NaN if the step was skipped)."""
        if closure is None:
            raise ValueError(
                "ZOOptimizer.step needs a closure that runs the forward and returns the loss, "
                "e.g. opt.step(lambda: model(**batch).loss); it calls it twice per direction."
            )
        est = self._estimate(closure, None)
        grads, skipped = self.reduce_projected_grads(est.projected_grads, est.skipped)
        self._finish(est.step, grads, skipped, est, probe=closure, baseline=est.loss)
        return torch.tensor(est.loss)

    def reduce_projected_grads(self, grads: Sequence[float], skipped: bool) -> tuple[list[float], bool]:
        """The step's one collective: the projected gradients averaged over ranks (a step skipped
        on any rank is skipped on all).  Under perturbation parallelism ``grads`` are this rank's
        accumulated probe losses and the pairs' gradients are formed here (``core.pairs``)."""
        if self._pair is not None:
            return self._pair.reduce(grads, skipped, n=self.grads_per_step)
        return all_reduce_projected_grads(grads, skipped, self.config, n=self.grads_per_step)

    def finish_step(
        self,
        grads: Sequence[float],
        skipped: bool,
        *,
        step: int,
        loss_plus: float,
        loss_minus: float,
        probe: Callable[[], Any] | None = None,
        baseline: float | None = None,
    ) -> None:
        """Apply (or skip) step ``step`` with already-accumulated (and all-reduced) projected
        gradients and record ``last_step``; what integrations call once per optimizer step.
        ``probe`` and ``baseline`` (a closure and its loss before the update) serve update
        rules that check a candidate ('zo-sgd-conservative')."""
        est = ZOEstimate(step, self.seeds_for(step)[0], list(grads), [loss_plus], [loss_minus], skipped)
        self._finish(step, list(grads), skipped, est, probe=probe, baseline=baseline)

    def _finish(self, step, grads, skipped, est, probe=None, baseline=None) -> None:
        lp = est.losses_plus[-1] if est.losses_plus else float("nan")
        lm = est.losses_minus[-1] if est.losses_minus else float("nan")
        if self._pair is not None and self._pair.losses is not None:
            lp, lm = self._pair.losses  # each rank probed one side: the exchanged pair losses
        plan = self.plan(step)
        if not skipped and self.estimator.finalize is not None:
            grads = self.estimator.finalize(list(grads), self.config)  # e.g. FZOO's normalisation
        clipped = False
        c = self.config.clip_projected_grad
        if c is not None and not skipped and any(abs(g) > c for g in grads):
            grads = [max(-c, min(c, g)) for g in grads]  # QZO-style clipping of the scalar
            clipped = True
            self.clipped_steps += 1
        rejected = False
        self._watch.clear()
        if not skipped and self.rule.accept is not None:
            rejected = not self.rule.accept(self, plan, grads, probe, baseline)
        if skipped:
            logger.warning(
                "ZO step %d skipped: non-finite loss (L+=%s, L-=%s); weights left unchanged.", step, lp, lm
            )
            self.skip(step=step)
        elif rejected:
            self.restore()
            self.rejected_steps += 1
            self._step = step + 1
        else:
            self.apply_update(grads, step=step)
        mean_g = sum(grads) / len(grads) if grads and not skipped else float("nan")
        self.last_step = ZOStepInfo(
            step,
            plan.seeds[0],
            mean_g,
            lp,
            lm,
            skipped,
            list(grads) if not skipped else [],
            clipped,
            rejected,
            self._watch.grad_norm if not skipped else float("nan"),
            self._watch.update_norm if not (skipped or rejected) else 0.0,
        )
        self._watch.note_loss(
            step, est.loss, self.config.maximize, [float(g["lr"]) for g in self.param_groups]
        )
        if self._recorder is not None:
            self._recorder.step(
                step,
                grads=grads,
                lrs=[float(g["lr"]) for g in self.param_groups],
                wds=[float(g["weight_decay"]) for g in self.param_groups],
                skipped=skipped or rejected,  # what replay must do: no update
                clipped=clipped,
            )

    # ------------------------------------------------------------------ replay
    def replay_step(self, record: dict[str, Any]) -> None:
        """Repeat one recorded step without a forward: its in-place passes (so their rounding
        matches the run's) and its update with the recorded projected gradients, learning
        rates and weight decays.  What ``zo_plugins.replay`` calls for every record."""
        step = int(record["step"])
        if step != self._step:
            raise ValueError(f"replay_step got step {step} but the optimizer is at step {self._step}.")
        plan = self.plan(step)
        for terms in record["shifts"]:
            self.perturber.shift(plan, [(plan.seeds[int(q)], float(c)) for q, c in terms])
        for group, lr, wd in zip(self.param_groups, record["lr"], record["wd"]):
            group["lr"], group["weight_decay"] = lr, wd
        if record["skipped"]:
            self.skip(step=step)
        else:
            self.apply_update(record["grads"], step=step)

    # ------------------------------------------------------------------ trajectory
    def trajectory_header(self) -> dict[str, Any]:
        """The header a trajectory log of this optimizer starts with."""
        from .._version import __version__

        cfg = {k: v for k, v in self.config.to_dict().items() if k != "trajectory_path"}
        return {
            "format": FORMAT,
            "version": VERSION,
            "stream_version": STREAM_VERSION,
            "library_version": __version__,
            "torch_version": torch.__version__,
            "backend": self.backend,
            "device": self.specs()[0].param.device.type,
            "triton_interpreted": self.backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") == "1",
            "stream": self.stream,
            "perturbation_mode": self._mode,
            "in_place": [s.name for s in self.specs() if s.in_place],
            "mask_fn": _qualname(self.mask_fn),
            "base_hash": weights_hash((s.name, s.param) for s in self.specs()),
            "config": cfg,
            "groups": [[s.name for s in g] for g in self._specs],
        }

    def sync_trajectory(self) -> None:
        """Force the trajectory records written so far to disk (when a checkpoint is saved)."""
        if self._recorder is not None:
            self._recorder.sync()

    def close(self, *, finished: bool = True) -> None:
        """Close the trajectory log.  ``finished`` (the default) writes its end record with
        the hash of the final weights, so ``replay`` can verify it reached them; pass
        ``finished=False`` for a run that stops to be resumed."""
        self.flush()
        if self._recorder is not None and self._recorder.is_open:
            self.restore()
            final = weights_hash((s.name, s.param) for s in self.specs()) if finished else None
            self._recorder.close(final)

    def __del__(self) -> None:
        try:
            if self._recorder is not None:
                self._recorder.close(None)
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state (momentum buffers, Adam moments) plus the ZO state: the step
        counter, the skipped/clipped/rejected counters, the stateless-momentum history and the
        config.  A resumed run continues bit for bit."""
        sd = super().state_dict()
        sd["zo"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "clipped_steps": self.clipped_steps,
            "rejected_steps": self.rejected_steps,
            "history": [[[str(s), c] for s, c in terms] for terms in self._history],
            "sparsity_thresholds": dict(self._thresholds),
            "config": self.config.to_dict(),
            "deferred": self._deferred.state_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is not None:
            saved_seed = zo.get("config", {}).get("seed", self.config.seed)
            if saved_seed != self.config.seed:
                raise ValueError(
                    f"This checkpoint was written with ZOConfig.seed={saved_seed} but the optimizer "
                    f"has seed={self.config.seed}; a resumed run must use the same seed."
                )
        super().load_state_dict(state_dict)
        # torch.optim.Optimizer casts floating state to each parameter's dtype; momentum and
        # Adam state are kept in float32 (float64 for float64 weights), and the fused kernels
        # read float32: reload them from the saved tensors, not from the lossy bf16 casts
        by_id = {
            pid: p
            for saved, group in zip(state_dict.get("param_groups", []), self.param_groups)
            for pid, p in zip(saved["params"], group["params"])
        }
        for pid, saved in state_dict.get("state", {}).items():
            p = by_id.get(pid)
            if p is None:
                continue
            dtype = torch.float64 if p.dtype == torch.float64 else torch.float32
            for k, v in saved.items():
                if k != "step" and isinstance(v, torch.Tensor) and v.is_floating_point():
                    self.state[p][k] = v.detach().to(dtype=dtype, device=p.device, copy=True).contiguous()
        if zo is not None:
            self._step = int(zo["step"])
            self.skipped_steps = int(zo.get("skipped_steps", 0))
            self.clipped_steps = int(zo.get("clipped_steps", 0))
            self.rejected_steps = int(zo.get("rejected_steps", 0))
            self._history = [[(int(s), float(c)) for s, c in terms] for terms in zo.get("history", [])]
            self._thresholds = {str(k): float(v) for k, v in zo.get("sparsity_thresholds", {}).items()}
            self._deferred.load_state_dict(zo.get("deferred"), self.specs())
        self.perturber.pending = []
        self._plan = None


def _qualname(fn: Callable | None) -> str | None:
    if fn is None:
        return None
    mod = getattr(fn, "__module__", None) or "?"
    return f"{mod}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def _check_quantized(specs: Sequence[ParamSpec], config: ZOConfig) -> None:
    """Refuse what quantized scales cannot serve, before any layer is touched."""
    scales = [s.name for s in specs if s.carrier is not None]
    if scales and config.estimator == "forward-grad":
        raise ValueError(
            f"estimator='forward-grad' needs forward-mode AD through the quantized kernels that read "
            f"{scales[0]!r}, which torchao and bitsandbytes do not provide: use estimator='spsa' (or "
            "another forward-only estimator) to train quantized scales."
        )


def _check_hyper(name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"Invalid {name}: {value!r}; use a finite number >= 0.")


def materialize_direction(
    opt: ZOOptimizer, param: torch.Tensor, *, step: int, query: int = 0
) -> torch.Tensor:
    """The full direction ``z`` that step ``step`` (query ``query``) applies to ``param``, in
    float32 and with frozen rows zeroed.  For tests and analysis: it allocates a tensor the
    size of ``param``, which the optimizer itself never does."""
    from .perturbation import perturbed_copy

    spec = next((s for s in opt.specs() if s.param is param), None)
    if spec is None:
        raise ValueError("That tensor is not one of the optimizer's parameters.")
    plan = opt._plan if opt._plan is not None and opt._plan.step == step else opt._make_plan(step)
    # the probe is a zero tensor: a mask must read the real weights, which the PyTorch
    # pass's mask callable does (the kernels would test the probe's zeros)
    copy = perturbed_copy if spec.mask is not None else plan.passes.copy
    seed = plan.seeds[query]
    return direction_tensor(spec, [(seed, plan.coef(seed))], opt.config, copy, distribution=opt.stream)
