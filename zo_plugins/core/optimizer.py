"""``ZOOptimizer``: the ``torch.optim`` face of the zeroth-order core.

``step(closure)`` runs ``closure()`` (a no-grad forward returning the loss) at
``theta + eps*z`` and at ``theta - eps*z``, forms the projected gradient
``g = (L+ - L-) / (2 eps)`` and applies ``theta <- theta - lr * (g*z + wd*theta)`` with each
param group's ``lr`` and ``weight_decay`` (so LR schedulers work unchanged).

Integrations (the HF callback, the Lightning strategies) use the two halves separately:
``estimate(closure, step=t)`` once per micro-batch, then ``apply_update(g, step=t)`` once per
optimizer step.  No integration re-implements a pass or an update rule.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from .backend import Passes, passes_for_masks, select_backend
from .noise import PHILOX_GAUSSIAN, mix64, step_seed, tensor_key
from .passes import HALF_DTYPES, ParamSpec, _Chunks, _frozen_slices, perturbed_copy
from .sparsity import sparsity_mask
from .trajectory import FORMAT, VERSION, TrajectoryWriter, weights_hash
from .updates import init_state

__all__ = ["ZOOptimizer", "ZOStepInfo", "ZOEstimate"]

logger = logging.getLogger("zo_plugins")


@dataclass
class ZOEstimate:
    """What one ``estimate`` call measured (one micro-batch, all directions)."""

    step: int
    step_seed: int
    projected_grads: list[float]
    losses_plus: list[float]
    losses_minus: list[float]
    skipped: bool
    calls: int = 0
    """Closure calls this estimate made (the one-time validation call is not counted)."""

    @property
    def loss(self) -> float:
        """Mean of all probed losses: the loss to report for this micro-batch."""
        vals = self.losses_plus + self.losses_minus
        return sum(vals) / len(vals) if vals else float("nan")


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


def _as_float_loss(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"The closure must return a scalar loss; it returned a tensor of shape "
                f"{tuple(value.shape)}. Reduce it (e.g. loss.mean()) inside the closure."
            )
        if value.requires_grad:
            raise ValueError(
                "The closure returned a loss that requires grad: ZO needs no autograd graph. "
                "Do not enable grad inside the closure (ZOOptimizer runs it under torch.no_grad())."
            )
        return float(value.detach().item())
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"The closure must return the loss as a scalar tensor or a float, not {type(value).__name__}."
    )


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD (MeZO/SPSA) as a ``torch.optim.Optimizer``.

    Args:
        params: an ``nn.Module`` (its trainable parameters; noise keys come from parameter
            names and embedding padding rows are frozen), an iterable of tensors, or an
            iterable of param-group dicts.
        lr: learning rate of the ZO-SGD update.
        eps: perturbation scale.
        weight_decay: L2 decay, ``theta <- theta - lr * wd * theta``.
        seed: base seed of the direction stream.
        model: the module that owns ``params`` when ``params`` are tensors or groups; gives
            stable names, padding rows, out-of-place perturbation and dropout="eval".
        ranking_oracle: for ``estimator='rank'``: a callable receiving the closure's outputs
            for the ``n_queries`` candidates and returning their indices best first (a human,
            a reward model); by default candidates are ranked by the closure's scalar.
        mask_fn: a user sparsity mask: ``mask_fn(name, param, step)`` returns a bool tensor
            of ``param``'s shape (True = perturbed and updated) or None for dense; called
            once per step.  With in-place perturbation it must not depend on the weights'
            values (they are perturbed between passes).
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
        self.config = ZOConfig(eps=eps, seed=seed, **zo_config_fields)
        _check_hyper("lr", lr)
        _check_hyper("weight_decay", weight_decay)
        if isinstance(params, nn.Module):
            model = params
            params = [p for p in params.parameters() if p.requires_grad]
        params = list(params)
        if not params:
            raise ValueError(
                "ZOOptimizer got no parameters: pass a model with trainable parameters "
                "(requires_grad=True) or a non-empty list of tensors."
            )
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.model = model
        self._specs = self._build_specs(model)
        self._mode = self._resolve_mode()
        self.backend, self._passes = self._resolve_backend()
        self.stream = self._resolve_stream()
        self._pending: list[tuple[int, float]] = []  # terms that restore in-place weights
        self._step = 0
        self.skipped_steps = 0
        self.clipped_steps = 0
        self._trajectory: TrajectoryWriter | None = None
        self._traj_shifts: list[list[list[float]]] = []
        self._traj_seeds: list[int] = []
        self._validated = False
        self._history: list[list[tuple[int, float]]] = []  # stateless momentum: recent terms
        self._scales: dict[int, float] = {}  # distribution='sphere': per-seed normalisation
        self.rejected_steps = 0  # zo-sgd-conservative: updates not taken
        self.ranking_oracle = ranking_oracle
        self.mask_fn = mask_fn
        self._blocks = self._build_blocks()
        self._active: list[ParamSpec] = self.specs()
        self.last_step = ZOStepInfo()

    # ------------------------------------------------------------------ setup
    def _build_specs(self, model: nn.Module | None) -> list[list[ParamSpec]]:
        names: dict[int, str] = {}
        frozen: dict[int, tuple[int, ...]] = {}
        if model is not None:
            for name, p in model.named_parameters(remove_duplicate=True):
                names.setdefault(id(p), name)
            for mod in model.modules():
                if isinstance(mod, nn.Embedding) and mod.padding_idx is not None:
                    frozen[id(mod.weight)] = (int(mod.padding_idx) % mod.weight.shape[0],)
        specs: list[list[ParamSpec]] = []
        seen: set[int] = set()
        for gi, group in enumerate(self.param_groups):
            gspecs = []
            for pi, p in enumerate(group["params"]):
                if not p.is_floating_point():
                    raise ValueError(
                        f"ZOOptimizer can only train floating-point tensors; parameter "
                        f"{names.get(id(p), f'{gi}.{pi}')} has dtype {p.dtype}."
                    )
                if p.device.type == "meta":
                    raise ValueError(
                        f"Parameter {names.get(id(p), f'{gi}.{pi}')} is on the meta device: "
                        "load real weights (e.g. model.to_empty(device=...) and a state_dict) first."
                    )
                if id(p) in seen:
                    raise ValueError("A parameter appears in more than one param group.")
                seen.add(id(p))
                if model is not None and id(p) not in names:
                    raise ValueError(
                        "A parameter given to ZOOptimizer does not belong to `model`; pass the "
                        "model that owns the parameters (or no model)."
                    )
                name = names.get(id(p), f"param_groups.{gi}.{pi}")
                gspecs.append(ParamSpec(p, name, tensor_key(name), frozen.get(id(p), ())))
            specs.append(gspecs)
        return specs

    def _resolve_mode(self) -> str:
        """Decide, per tensor, whether perturbations are applied in place or out of place."""
        mode = self.config.perturbation
        halves = [s.name for s in self.specs() if s.param.dtype in HALF_DTYPES]
        if mode == "out-of-place" and self.model is None:
            raise ValueError(
                "perturbation='out-of-place' needs the model: use ZOOptimizer(model, ...) or "
                "ZOOptimizer(params, ..., model=model)."
            )
        if halves and (mode == "in-place" or self.model is None):
            raise ValueError(
                f"bf16/fp16 weights (e.g. {halves[0]!r}) cannot be perturbed in place and restored "
                "exactly: a +eps/-2eps/+eps round trip drifts 20-150x the size of a MeZO update. "
                "Pass the model (ZOOptimizer(model, ...)) so they are perturbed out of place, or "
                "keep these weights in float32."
            )
        if self.config.dropout == "eval" and self.model is None:
            raise ValueError(
                "dropout='eval' needs the model to switch to eval(): use ZOOptimizer(model, ...)."
            )
        cfg = self.config
        needs_model = cfg.estimator == "forward-grad" or (cfg.sparsity and cfg.sparsity_mode == "magnitude")
        if needs_model and self.model is None:
            raise ValueError(
                f"estimator={cfg.estimator!r} / sparsity_mode={cfg.sparsity_mode!r} applies perturbations "
                "out of place and needs the model: use ZOOptimizer(model, ...)."
            )
        for spec in self.specs():
            if needs_model:  # every pass must see the unperturbed weights
                spec.in_place = False
            elif mode == "auto":  # fp32/fp64: in place, the least memory; half: exact, out of place
                spec.in_place = spec.param.dtype not in HALF_DTYPES
            else:
                spec.in_place = mode == "in-place"
        kinds = {s.in_place for s in self.specs()}
        return "mixed" if len(kinds) == 2 else ("in-place" if True in kinds else "out-of-place")

    def specs(self) -> list[ParamSpec]:
        return [s for g in self._specs for s in g]

    def _resolve_backend(self) -> tuple[str, Passes]:
        name, passes, self.backend_reason = select_backend(self.config.backend, self.specs())
        return name, passes

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

    def _passes_for_step(self) -> Passes:
        """The backend's passes for this step's masks (``core.backend.passes_for_masks``)."""
        return passes_for_masks(self.backend, self._passes, self.specs())

    def active_specs(self) -> list[ParamSpec]:
        """The tensors this step perturbs and updates (all of them unless ``block_wise``)."""
        return self._active

    def _build_blocks(self) -> list[list[ParamSpec]]:
        """Blocks for block-wise descent: parameters sharing the name prefix up to their first
        numeric component (a transformer layer), or one block per other tensor."""
        blocks: dict[str, list[ParamSpec]] = {}
        for spec in self.specs():
            parts = spec.name.split(".")
            idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
            prefix = ".".join(parts[: idx + 1]) if idx is not None else spec.name
            blocks.setdefault(prefix, []).append(spec)
        return list(blocks.values())

    @property
    def perturbation_mode(self) -> str:
        """The resolved perturbation mode: 'in-place', 'out-of-place' or 'mixed' (auto with
        float32 and half-precision trainable tensors)."""
        return self._mode

    @property
    def step_count(self) -> int:
        """Optimizer steps taken (applied or skipped); the default step index of ``step``."""
        return self._step

    def seeds_for(self, step: int) -> list[int]:
        """Direction seeds of optimizer step ``step``, one per query."""
        base = step_seed(self.config.seed, step)
        return [base if q == 0 else mix64(base, q) for q in range(self.config.n_queries)]

    # ------------------------------------------------------------------ perturbation
    def _shift_in_place(self, terms: list[tuple[int, float]]) -> None:
        """Move in-place weights from their current perturbation to ``theta + sum(terms)``,
        fusing any pending restore into the same pass."""
        merged: dict[int, float] = {}
        for seed, coeff in self._pending + terms:
            merged[seed] = merged.get(seed, 0.0) + coeff
        todo = [(s, c) for s, c in merged.items() if c != 0.0]
        if self._trajectory is not None:
            self._traj_shifts.append([[self._query_of(seed), coeff] for seed, coeff in terms])
        if todo:
            self._passes_for_step().perturb(
                [s for s in self.active_specs() if s.in_place],
                todo,
                distribution=self.stream,
                chunk_size=self.config.chunk_size,
            )
        self._pending = [(s, -c) for s, c in terms]

    def _query_of(self, seed: int) -> int:
        try:
            return self._traj_seeds.index(seed)
        except ValueError:
            raise RuntimeError("internal: a perturbation seed outside the current step") from None

    def restore(self) -> None:
        """Undo a pending in-place perturbation (no-op when none is pending)."""
        if self._pending:
            self._shift_in_place([])

    @contextmanager
    def _perturbed(self, seed: int, coeff: float):
        with self._perturbed_terms([(seed, coeff * self._coef(seed))]):
            yield

    @contextmanager
    def _perturbed_terms(self, terms: list[tuple[int, float]]):
        """Weights at ``theta + sum(coeff * z(seed))`` for the duration of the block."""
        if any(s.in_place for s in self.active_specs()):
            self._shift_in_place(terms)
        oop = [s for s in self.active_specs() if not s.in_place]
        if not oop:
            yield
        else:
            with _OutOfPlace(self.model, oop, terms, self.config, self.stream, copy=self._passes_for_step().copy):
                yield

    @contextmanager
    def _forward_mode(self):
        if self.config.dropout != "eval":
            yield
            return
        flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            yield
        finally:
            for m, t in flags:
                m.training = t

    # ------------------------------------------------------------------ estimate / update
    def estimate(self, closure: Callable[[], Any], *, step: int | None = None) -> ZOEstimate:
        """Probe the closure around ``theta`` for step ``step`` with the configured estimator;
        ``projected_grads`` holds one coefficient per direction (per coordinate for 'cge').

        Weights are not updated.  In in-place mode the last perturbation is left pending and
        is undone by the next pass (fused), by ``apply_update`` or by ``restore()``.
        A NaN/inf loss ends the probe early, restores the weights and marks it skipped.
        """
        step = self._step if step is None else step
        if not self._validated:
            self._validate_closure(closure)
        self._begin_step(step)
        seeds = self.seeds_for(step)
        est = ZOEstimate(step, seeds[0], [], [], [], False)
        rng = _RngState(self.specs()) if self.config.dropout == "same-masks" else None
        probe = getattr(self, "_estimate_" + self.config.estimator.replace("-", "_"))

        def counted() -> Any:
            est.calls += 1
            return closure()

        try:
            with torch.no_grad(), self._forward_mode():
                probe(counted, seeds, est, rng)
        except BaseException:
            self.restore()  # a closure that raised never leaves the weights perturbed
            raise
        if est.skipped:
            self.restore()
        return est

    def _loss(self, closure: Callable[[], Any], rng: _RngState | None) -> float:
        if rng is not None:
            rng.restore()
        return _as_float_loss(closure())

    @property
    def _sign(self) -> float:
        return -1.0 if self.config.maximize else 1.0

    def _estimate_spsa(self, closure, seeds, est: ZOEstimate, rng) -> None:
        eps = self.config.eps
        for seed in seeds:
            losses = []
            for coeff in (eps, -eps):
                # in-place: +eps from theta, then -2eps from theta + eps*z
                with self._perturbed(seed, coeff):
                    losses.append(self._loss(closure, rng))
                if not math.isfinite(losses[-1]):
                    break
            est.losses_plus.append(losses[0])
            est.losses_minus.append(losses[1] if len(losses) > 1 else float("nan"))
            if len(losses) < 2 or not all(math.isfinite(v) for v in losses):
                est.skipped = True
                return
            est.projected_grads.append(self._sign * (losses[0] - losses[1]) / (2 * eps))

    def _estimate_forward(self, closure, seeds, est: ZOEstimate, rng) -> None:
        eps = self.config.eps
        self.restore()
        base = self._loss(closure, rng)
        for seed in seeds:
            with self._perturbed(seed, eps):
                loss = self._loss(closure, rng)
            est.losses_plus.append(loss)
            est.losses_minus.append(base)  # the unperturbed loss, shared by all directions
            if not (math.isfinite(loss) and math.isfinite(base)):
                est.skipped = True
                return
            est.projected_grads.append(self._sign * (loss - base) / eps)

    def _estimate_rank(self, closure, seeds, est: ZOEstimate, rng) -> None:
        """ZO-RankSGD: only the ranking of the candidates theta + eps*z_j enters the update,
        d = sum over ranked pairs (better i, worse j) of (z_j - z_i) / #pairs; descending
        along -d.  Candidate j's coefficient is (2 p_j - m + 1) / (m (m - 1) / 2) with p_j its
        rank (0 = best)."""
        eps, m = self.config.eps, len(seeds)
        outputs, losses = [], []
        for seed in seeds:
            with self._perturbed(seed, eps):
                if rng is not None:
                    rng.restore()
                out = closure()
            if self.ranking_oracle is None:
                loss = _as_float_loss(out)
                losses.append(loss)
                if not math.isfinite(loss):
                    est.losses_plus, est.skipped = losses, True
                    return
            outputs.append(out)
        if self.ranking_oracle is not None:
            order = [int(i) for i in self.ranking_oracle(outputs)]
            if sorted(order) != list(range(m)):
                raise ValueError(
                    f"ranking_oracle must return a permutation of range({m}) (best first); got {order}."
                )
        else:
            order = sorted(range(m), key=lambda j: self._sign * losses[j])
        est.losses_plus = losses or [float("nan")] * m
        est.losses_minus = [float("nan")] * m
        pairs = m * (m - 1) / 2
        coef = [0.0] * m
        for p, j in enumerate(order):
            coef[j] = (2 * p - m + 1) / pairs
        # apply_update divides by n_queries: hand it m * coefficient
        est.projected_grads = [m * c for c in coef]

    def _estimate_forward_grad(self, closure, seeds, est: ZOEstimate, rng) -> None:
        import torch.autograd.forward_ad as fwAD
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for seed in seeds:
            # the fused CPU/flash attention kernels have no forward-AD formula; the math one has
            with (
                fwAD.dual_level(),
                sdpa_kernel(SDPBackend.MATH),
                _OutOfPlace(
                    self.model, self.active_specs(), [(seed, self._coef(seed))], self.config, self.stream, dual=True
                ),
            ):
                if rng is not None:
                    rng.restore()
                out = closure()
                if not isinstance(out, torch.Tensor) or out.numel() != 1:
                    raise ValueError(
                        "estimator='forward-grad' needs the closure to return a scalar loss tensor."
                    )
                primal, tangent = fwAD.unpack_dual(out)
                loss = float(primal.detach().item())
                deriv = float(tangent.item()) if tangent is not None else 0.0
            est.losses_plus.append(loss)
            est.losses_minus.append(loss)
            if not (math.isfinite(loss) and math.isfinite(deriv)):
                est.skipped = True
                return
            est.projected_grads.append(self._sign * deriv)

    def _cge_coordinates(self, step: int) -> list[tuple[ParamSpec, int]]:
        specs = [sp for sp in self.active_specs() if sp.param.numel()]
        sizes = [sp.param.numel() for sp in specs]
        total = sum(sizes)
        gen = torch.Generator().manual_seed(mix64(step_seed(self.config.seed, step), 0xC6E) >> 1)
        picks = torch.randint(0, total, (self.config.cge_coordinates,), generator=gen).tolist()
        bounds = torch.tensor(sizes).cumsum(0).tolist()
        out = []
        for g in picks:
            k = next(i for i, b in enumerate(bounds) if g < b)
            out.append((specs[k], g - (bounds[k - 1] if k else 0)))
        return out

    def _estimate_cge(self, closure, seeds, est: ZOEstimate, rng) -> None:
        """DeepZero's coordinate-wise estimate: each sampled coordinate i is set to
        theta_i +/- eps (the original value is saved, so restore is exact in every dtype)
        and g_i = (L+ - L-) / (actual difference of the two stored values)."""
        eps = self.config.eps
        for spec, i in self._cge_coordinates(est.step):
            flat = spec.param.data.view(-1)
            frozen = any(s.start <= 0 < s.stop for s in _frozen_slices(spec, i, 1))
            masked = spec.mask is not None and not bool(spec.mask(i, 1)[0])
            if frozen or masked:
                est.projected_grads.append(0.0)
                continue
            orig = flat[i].clone()
            vals, losses = [], []
            try:
                for c in (eps, -eps):
                    flat[i] = (orig.double() + c).to(flat.dtype)
                    vals.append(float(flat[i].double()))
                    losses.append(self._loss(closure, rng))
            finally:
                flat[i] = orig
            est.losses_plus.append(losses[0])
            est.losses_minus.append(losses[1])
            if not all(math.isfinite(v) for v in losses) or vals[0] == vals[1]:
                est.skipped = True
                return
            est.projected_grads.append(self._sign * (losses[0] - losses[1]) / (vals[0] - vals[1]))

    def _validate_closure(self, closure: Callable[[], Any]) -> None:
        """Run the closure once on the unperturbed weights before the first perturbation, so a
        closure that fails or returns something unusable is reported while every weight is
        still untouched.  The RNG is forked, so the check shifts no dropout stream."""
        cuda = sorted({s.param.device.index or 0 for s in self.specs() if s.param.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), self._forward_mode():
            _as_float_loss(closure())
        self._validated = True

    def apply_update(self, projected_grads: Sequence[float], *, step: int | None = None) -> None:
        """Apply the configured update rule for step ``step`` (default: the current step)
        along ``d = mean_q g_q z_q`` with each group's ``lr`` and ``weight_decay``; fuses the
        restore of a pending in-place perturbation into the same pass; advances the step."""
        step = self._step if step is None else step
        self._begin_step(step)
        cfg = self.config
        expected = cfg.cge_coordinates if cfg.estimator == "cge" else cfg.n_queries
        if len(projected_grads) != expected:
            raise ValueError(
                f"apply_update got {len(projected_grads)} projected gradients; this configuration "
                f"(estimator={cfg.estimator!r}) makes {expected} per step."
            )
        if not all(math.isfinite(g) for g in projected_grads):
            raise ValueError(f"Non-finite projected gradient {list(projected_grads)}; skip the step instead.")
        if cfg.estimator == "cge":
            self._apply_cge(projected_grads, step)
        else:
            self._apply_directions(projected_grads, step)
        self._pending = []
        self._step = step + 1

    def _direction_terms(self, projected_grads: Sequence[float], step: int) -> list[tuple[int, float]]:
        """The estimated gradient of this step as (seed, coefficient) terms; with stateless
        momentum, the beta-weighted terms of the last ``momentum_history`` steps too."""
        seeds = self.seeds_for(step)
        terms = [(s, g / len(seeds) * self._coef(s)) for s, g in zip(seeds, projected_grads)]
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

    def _apply_directions(self, projected_grads: Sequence[float], step: int) -> None:
        cfg = self.config
        restore = self._pending
        terms = self._direction_terms(projected_grads, step)
        round_seed = mix64(self.seeds_for(step)[0], 0x5D) if cfg.stochastic_rounding else None
        rule = {"zo-sgd-sign": "sign", "zo-adam": "adam"}.get(cfg.optimizer)
        if cfg.optimizer == "zo-sgd-momentum" and cfg.momentum_history == 0:
            rule = "momentum"
        active = {id(sp) for sp in self.active_specs()}
        passes = self._passes_for_step()
        groups = []
        for group, gspecs in zip(self.param_groups, self._specs):
            lr, wd = float(group["lr"]), float(group["weight_decay"])
            _check_hyper("lr", lr)
            _check_hyper("weight_decay", wd)
            groups.append((lr, wd, [sp for sp in gspecs if id(sp) in active]))
        for lr, wd, specs in groups:
            if not specs:
                continue
            if rule is None:
                passes.update_group(
                    specs,
                    restore=restore,
                    update=[(s, -lr * c) for s, c in terms if lr * c != 0.0],
                    decay=lr * wd,
                    distribution=self.stream,
                    chunk_size=cfg.chunk_size,
                    round_seed=round_seed,
                )
                continue
            states, steps = [], []
            for spec in specs:
                state = self.state[spec.param]
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
                distribution=self.stream,
                chunk_size=cfg.chunk_size,
                round_seed=round_seed,
            )

    def _apply_cge(self, projected_grads: Sequence[float], step: int) -> None:
        group_of = {id(sp): g for g, gspecs in zip(self.param_groups, self._specs) for sp in gspecs}
        with torch.no_grad():
            for (spec, i), g in zip(self._cge_coordinates(step), projected_grads):
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

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> torch.Tensor | None:  # type: ignore[override]
        """One ZO step: two forwards per direction through ``closure``, then the update.

        Returns the mean probed loss as a tensor (NaN if the step was skipped)."""
        if closure is None:
            raise ValueError(
                "ZOOptimizer.step needs a closure that runs the forward and returns the loss, "
                "e.g. opt.step(lambda: model(**batch).loss); it calls it twice per direction."
            )
        est = self.estimate(closure)
        grads, skipped = all_reduce_projected_grads(est.projected_grads, est.skipped, self.config)
        self._finish(est.step, est.step_seed, grads, skipped, est, probe=closure, baseline=est.loss)
        return torch.tensor(est.loss)

    def _conservative_rejects(self, grads: list[float], step: int, probe, baseline: float) -> bool:
        """ZO-Bench's conservative rule: probe the loss at the updated weights (without
        writing them out of place; in place the candidate becomes the current weights) and
        reject the update if it is worse than ``baseline``."""
        lrs = {float(g["lr"]) for g in self.param_groups}
        if len(lrs) != 1:
            raise ValueError("optimizer='zo-sgd-conservative' needs one learning rate for all param groups.")
        lr = lrs.pop()
        terms = [(s, -lr * g / len(grads) * self._coef(s)) for s, g in zip(self.seeds_for(step), grads)]
        cuda = sorted({s.param.device.index or 0 for s in self.specs() if s.param.is_cuda})
        with torch.no_grad(), torch.random.fork_rng(devices=cuda), self._forward_mode():
            with self._perturbed_terms(terms):
                new = _as_float_loss(probe())
        return not math.isfinite(new) or self._sign * new > self._sign * baseline

    def _finish(
        self,
        step: int,
        seed: int,
        grads: list[float],
        skipped: bool,
        est: ZOEstimate | None,
        probe: Callable[[], Any] | None = None,
        baseline: float | None = None,
    ) -> None:
        lp = est.losses_plus[-1] if est and est.losses_plus else float("nan")
        lm = est.losses_minus[-1] if est and est.losses_minus else float("nan")
        self._begin_step(step)
        clipped = False
        c = self.config.clip_projected_grad
        if c is not None and not skipped and any(abs(g) > c for g in grads):
            grads = [max(-c, min(c, g)) for g in grads]  # QZO-style clipping of the scalar
            clipped = True
            self.clipped_steps += 1
        rejected = False
        if (
            not skipped
            and self.config.optimizer == "zo-sgd-conservative"
            and probe is not None
            and baseline is not None
            and math.isfinite(baseline)
        ):
            rejected = self._conservative_rejects(grads, step, probe, baseline)
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
            step, seed, mean_g, lp, lm, skipped, list(grads) if not skipped else [], clipped, rejected
        )
        skipped = skipped or rejected  # what replay must do: no update
        if self._trajectory is not None:
            self._trajectory.append(
                {
                    "step": step,
                    "grads": [] if skipped else [float(g) for g in grads],
                    "lr": [float(g["lr"]) for g in self.param_groups],
                    "wd": [float(g["weight_decay"]) for g in self.param_groups],
                    "shifts": self._traj_shifts,
                    "skipped": skipped,
                    "clipped": clipped,
                }
            )
        self._traj_shifts = []

    def _sphere_scales(self, seeds: Sequence[int]) -> dict[int, float]:
        """distribution='sphere': ``sqrt(D) / ||z(seed)||`` per seed, with ``z`` the Gaussian
        direction over the D coordinates this step perturbs (frozen rows and masked elements
        excluded), so ``scale * z`` is uniform on the sphere of radius sqrt(D).  One extra
        generation pass per direction; nothing is stored."""
        chunks = _Chunks(self.config.chunk_size, self.stream)
        out = {}
        for seed in seeds:
            sq, count = 0.0, 0
            for spec in self.active_specs():
                for start, n in chunks.ranges(spec.param.numel()):
                    z = chunks.direction(spec, seed, start, n)
                    sq += float(z.double().square().sum())
                    on = torch.ones(n, dtype=torch.bool, device=z.device)
                    for sl in _frozen_slices(spec, start, n):
                        on[sl] = False
                    if spec.mask is not None:
                        on &= spec.mask(start, n)
                    count += int(on.sum())
            out[seed] = math.sqrt(count / sq) if sq > 0 else 0.0
        return out

    def _coef(self, seed: int) -> float:
        """The factor turning the stream's direction ``z(seed)`` into this step's direction
        (1 except for distribution='sphere')."""
        return self._scales.get(seed, 1.0)

    # ------------------------------------------------------------------ trajectory
    def _begin_step(self, step: int) -> None:
        """Open the trajectory log before the first weight changes (base hash), and note the
        seeds of the step so recorded passes name their direction by query index."""
        self._traj_seeds = self.seeds_for(step)
        cfg = self.config
        if cfg.block_wise is not None:
            nb = len(self._blocks)
            b = step % nb if cfg.block_wise == "cycle" else mix64(cfg.seed, step, 0xB10C) % nb
            self._active = self._blocks[b]
        for spec in self.specs():
            spec.mask = sparsity_mask(spec, cfg, step) if cfg.sparsity else None
            if self.mask_fn is not None:
                spec.mask = _user_mask(self.mask_fn, spec, step, spec.mask)
        self._scales = self._sphere_scales(self._traj_seeds) if cfg.distribution == "sphere" else {}
        if self._trajectory is None and self.config.trajectory_path:
            self._trajectory = TrajectoryWriter(self.config.trajectory_path, self.trajectory_header(), step)

    def trajectory_header(self) -> dict[str, Any]:
        """The header a trajectory log of this optimizer starts with."""
        from .. import __version__

        cfg = {k: v for k, v in self.config.to_dict().items() if k != "trajectory_path"}
        cfg = json.loads(json.dumps(cfg))  # the form it takes in the log (tuples -> lists)
        return {
            "format": FORMAT,
            "version": VERSION,
            "library_version": __version__,
            "torch_version": torch.__version__,
            "backend": self.backend,
            "base_hash": weights_hash((s.name, s.param) for s in self.specs()),
            "config": cfg,
            "groups": [[s.name for s in g] for g in self._specs],
        }

    def close(self) -> None:
        """Flush and close the trajectory log (also done when the optimizer is collected)."""
        if self._trajectory is not None:
            self._trajectory.close()
            self._trajectory = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

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
        """Apply (or skip) step ``step`` with already-accumulated projected gradients and
        record ``last_step``; what integrations call once per optimizer step.  ``probe`` and
        ``baseline`` (a closure and its loss before the update) serve 'zo-sgd-conservative'."""
        est = ZOEstimate(step, self.seeds_for(step)[0], list(grads), [loss_plus], [loss_minus], skipped)
        self._finish(step, est.step_seed, list(grads), skipped, est, probe=probe, baseline=baseline)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["zo"] = {
            "step": self._step,
            "skipped_steps": self.skipped_steps,
            "clipped_steps": self.clipped_steps,
            "rejected_steps": self.rejected_steps,
            "history": [[[str(sd_), c] for sd_, c in terms] for terms in self._history],
            "config": self.config.to_dict(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
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
            saved_seed = zo.get("config", {}).get("seed", self.config.seed)
            if saved_seed != self.config.seed:
                raise ValueError(
                    f"This checkpoint was written with ZOConfig.seed={saved_seed} but the optimizer "
                    f"has seed={self.config.seed}; a resumed run must use the same seed."
                )
            self._step = int(zo["step"])
            self.skipped_steps = int(zo.get("skipped_steps", 0))
            self.clipped_steps = int(zo.get("clipped_steps", 0))
            self.rejected_steps = int(zo.get("rejected_steps", 0))
            self._history = [[(int(sd_), float(c)) for sd_, c in terms] for terms in zo.get("history", [])]
        self._pending = []


def _check_hyper(name: str, value: Any) -> None:
    if (
        not isinstance(value, (int, float))
        or isinstance(value, bool)
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"Invalid {name}: {value!r}; use a finite number >= 0.")


def all_reduce_projected_grads(
    grads: Sequence[float], skipped: bool, config: ZOConfig
) -> tuple[list[float], bool]:
    """Average the projected gradients over ranks (one small all-reduce); a step skipped on
    any rank is skipped on all.  Identity outside torch.distributed."""
    import torch.distributed as dist

    grads = list(grads)
    if (
        not (config.all_reduce and dist.is_available() and dist.is_initialized())
        or dist.get_world_size() == 1
    ):
        return grads, skipped
    n = config.n_queries
    vals = grads if len(grads) == n and not skipped else [0.0] * n
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = torch.tensor(vals + [1.0 if skipped else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    world = dist.get_world_size()
    if buf[-1].item() > 0:
        return [], True
    return [v / world for v in buf[:-1].tolist()], False


def _user_mask(fn, spec: ParamSpec, step: int, inner):
    m = fn(spec.name, spec.param, step)
    if m is None:
        return inner
    if not isinstance(m, torch.Tensor) or m.dtype != torch.bool or m.shape != spec.param.shape:
        raise ValueError(
            f"mask_fn must return a bool tensor of shape {tuple(spec.param.shape)} (or None) for "
            f"{spec.name!r}; got {type(m).__name__} {getattr(m, 'dtype', '')} {tuple(getattr(m, 'shape', ()))}."
        )
    flat = m.to(spec.param.device).reshape(-1)

    def mask(start: int, n: int) -> torch.Tensor:
        own = flat[start : start + n]
        return own if inner is None else own & inner(start, n)

    return mask


class _RngState:
    """CPU and CUDA RNG states saved before the first forward and restored before each
    later one, so every forward of a step sees the same dropout masks."""

    def __init__(self, specs: list[ParamSpec]) -> None:
        self.cpu = torch.get_rng_state()
        devs = {s.param.device for s in specs if s.param.device.type == "cuda"}
        self.cuda = {d: torch.cuda.get_rng_state(d) for d in devs}
        self.first = True

    def restore(self) -> None:
        if self.first:
            self.first = False
            return
        torch.set_rng_state(self.cpu)
        for d, s in self.cuda.items():
            torch.cuda.set_rng_state(s, d)


class _OutOfPlace:
    """Forward hooks that hand each module ``theta + sum(terms)`` while it runs.

    The pre-hook swaps the module's trainable entries of ``_parameters`` for freshly
    generated perturbed copies; the forward hook (``always_call``) puts the parameters back.
    Weights are never written, so restore is exact in every dtype.  Tied weights (an
    embedding shared with the LM head) are perturbed identically in each owner because the
    copy is regenerated from the same key.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: list[ParamSpec],
        terms,
        config: ZOConfig,
        stream: str,
        *,
        dual: bool = False,
        copy: Callable[..., torch.Tensor] = perturbed_copy,
    ) -> None:
        self.model, self.terms, self.config, self.dual, self.copy = model, terms, config, dual, copy
        self.stream = stream
        by_id = {id(s.param): s for s in specs}
        self.owners: dict[nn.Module, list[tuple[str, ParamSpec]]] = {}
        for mod in model.modules():
            for attr, p in mod._parameters.items():
                if p is not None and id(p) in by_id:
                    self.owners.setdefault(mod, []).append((attr, by_id[id(p)]))
        self.specs = specs
        self.visited: set[int] = set()
        self.handles: list[Any] = []
        self.saved: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}
        self.depth: dict[nn.Module, int] = {}

    def _pre(self, mod: nn.Module, args: Any) -> None:
        d = self.depth.get(mod, 0)
        self.depth[mod] = d + 1
        if d:
            return
        saved = []
        for attr, spec in self.owners[mod]:
            saved.append((attr, mod._parameters[attr]))
            if self.dual:  # forward-grad: theta carrying the tangent z (forward-mode AD)
                import torch.autograd.forward_ad as fwAD

                z = direction_tensor(spec, self.terms, self.config, distribution=self.stream)
                mod._parameters[attr] = fwAD.make_dual(spec.param.detach(), z.to(spec.param.dtype))
            else:
                mod._parameters[attr] = self.copy(
                    spec, self.terms, distribution=self.stream, chunk_size=self.config.chunk_size
                )
            self.visited.add(id(spec.param))
        self.saved[mod] = saved

    def _post(self, mod: nn.Module, args: Any, output: Any) -> None:
        self.depth[mod] -= 1
        if self.depth[mod] == 0:
            for attr, p in self.saved.pop(mod, []):
                mod._parameters[attr] = p

    def __enter__(self) -> _OutOfPlace:
        for mod in self.owners:
            self.handles.append(mod.register_forward_pre_hook(self._pre))
            self.handles.append(mod.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self.handles:
            h.remove()
        for mod, saved in self.saved.items():  # a forward that raised before its post-hook
            for attr, p in saved:
                mod._parameters[attr] = p
        self.saved.clear()
        if exc_type is None:
            missing = [s.name for s in self.specs if id(s.param) not in self.visited]
            if missing:
                raise RuntimeError(
                    f"Out-of-place perturbation never reached {missing[:3]}"
                    f"{' and more' if len(missing) > 3 else ''}: the forward used these "
                    "parameters without calling the module that owns them (or did not use "
                    "them at all). Freeze them (requires_grad=False), or use "
                    "perturbation='in-place' with float32 weights."
                )


def direction_tensor(
    spec: ParamSpec, terms, config: ZOConfig, copy=perturbed_copy, *, distribution: str | None = None
) -> torch.Tensor:
    """``sum(coeff * z(seed))`` for the whole of ``spec`` as a float32 tensor (frozen rows and
    masked elements zero), drawn from ``distribution`` (a ``core.noise.STREAMS`` name; default
    ``config.distribution``)."""
    zeros = torch.zeros(spec.param.shape, dtype=torch.float32, device=spec.param.device)
    probe = ParamSpec(zeros, spec.name, spec.key, spec.frozen_rows, mask=spec.mask)
    return copy(probe, terms, distribution=distribution or config.distribution, chunk_size=config.chunk_size)


def materialize_direction(
    opt: ZOOptimizer, param: torch.Tensor, *, step: int, query: int = 0
) -> torch.Tensor:
    """The full direction ``z`` that step ``step`` (query ``query``) applies to ``param``, in
    float32 and with frozen rows zeroed.  For tests and analysis: it allocates a tensor the
    size of ``param``, which the optimizer itself never does."""
    spec = next((s for s in opt.specs() if s.param is param), None)
    if spec is None:
        raise ValueError("That tensor is not one of the optimizer's parameters.")
    # the probe is a zero tensor: a mask must read the real weights, which the PyTorch
    # pass's mask callable does (the kernels would test the probe's zeros)
    copy = perturbed_copy if spec.mask is not None else opt._passes_for_step().copy
    seed = opt.seeds_for(step)[query]
    scale = 1.0
    if opt.config.distribution == "sphere":  # the step's scale, or computed now on the current weights
        scale = opt._scales[seed] if seed in opt._scales else opt._sphere_scales([seed])[seed]
    return direction_tensor(spec, [(seed, scale)], opt.config, copy, distribution=opt.stream)
