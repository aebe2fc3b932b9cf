"""Estimators of the projected gradient: a registry of functions over a step's ``Probe``.

An estimator evaluates the closure at perturbed weights through ``probe.loss(terms)`` (or
``probe.output(terms)``) and fills ``probe.est``: one projected-gradient coefficient per
direction (``grads_per_step`` of them), the probed losses, and ``skipped`` when a loss is
NaN/inf.  It never writes the weights itself, so every estimator works with both
perturbation modes, every backend, every update rule and every integration.

Adding one is a function and a ``register_estimator(Estimator(...))`` call; ``ZOConfig``
accepts every registered name.

Built in (formulas in docs/methods.md):

* ``spsa`` -- two-point central difference ``(L(θ+εz) - L(θ-εz)) / 2ε`` (MeZO);
* ``forward`` -- one-point ``(L(θ+εz) - L(θ)) / ε``, the unperturbed loss shared;
* ``forward-grad`` -- the exact ``∇L·z`` by forward-mode AD;
* ``cge`` -- coordinate-wise differences of sampled coordinates (DeepZero);
* ``rank`` -- ZO-RankSGD: only the ranking of the candidates ``θ+εz_j`` is used;
* ``fzoo`` -- FZOO: ``N`` one-sided probes and the unperturbed loss, the step normalised by
  the spread of the probed losses (optionally all in one batched pass);
* ``hizoo`` -- HiZOO's three probes ``L(θ)``, ``L(θ ± ε H^-1/2 z)`` for the 'hizoo' rule.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..config import ZOConfig
from .noise import mix64, step_seed
from .passes import ParamSpec, _frozen_slices
from .perturbation import Perturber, RngState
from .plan import StepPlan
from .registry import ESTIMATORS, Estimator, get_estimator, register_estimator

logger = logging.getLogger("zo_plugins")

__all__ = [
    "ZOEstimate",
    "Probe",
    "Estimator",
    "ESTIMATORS",
    "register_estimator",
    "get_estimator",
    "as_float_loss",
]


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
    outputs: list[Any] = field(default_factory=list)
    """What the closure returned for each candidate, when an estimator ranks raw outputs."""

    @property
    def loss(self) -> float:
        """Mean of the finite probed losses: the loss to report for this micro-batch (NaN when
        there is none, e.g. a ranking oracle over generated text)."""
        vals = [v for v in self.losses_plus + self.losses_minus if math.isfinite(v)]
        if self.skipped or not vals:
            return float("nan")
        return sum(vals) / len(vals)


def as_float_loss(value: Any) -> float:
    """The closure's return value as a float: a scalar tensor or a number."""
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


class Probe:
    """A step's view for an estimator: the closure at perturbed weights, the plan, the
    estimate to fill.  ``loss(terms)`` runs the closure at ``theta + sum(terms)`` with the
    step's dropout masks and returns a float."""

    def __init__(
        self,
        closure: Callable[[], Any],
        plan: StepPlan,
        perturber: Perturber,
        config: ZOConfig,
        est: ZOEstimate,
        rng: RngState | None,
        *,
        model: torch.nn.Module | None = None,
        ranking_oracle: Callable[[list[Any]], Sequence[int]] | None = None,
    ) -> None:
        self.closure, self.plan, self.perturber, self.config = closure, plan, perturber, config
        self.est, self.rng, self.model, self.ranking_oracle = est, rng, model, ranking_oracle

    @property
    def eps(self) -> float:
        return self.config.eps

    @property
    def sign(self) -> float:
        """-1 when maximising, so ascent directions get negative projected gradients."""
        return -1.0 if self.config.maximize else 1.0

    def output(self, terms: list[tuple[int, float]], convert: Callable[[Any], Any] | None = None) -> Any:
        """The closure's return value at ``theta + sum(terms)`` (through ``convert``, which
        runs while the perturbation is in place, so its errors come first)."""
        with self.perturber.perturbed(self.plan, terms):
            if self.rng is not None:
                self.rng.restore()
            out = self.closure()
            return out if convert is None else convert(out)

    def loss(self, terms: list[tuple[int, float]]) -> float:
        return self.output(terms, as_float_loss)

    def losses(self, term_lists: list[list[tuple[int, float]]]) -> list[float]:
        """The loss at ``theta + sum(terms)`` for each entry of ``term_lists``.  One closure
        call per entry (stopping after the first non-finite loss), or, with
        ``ZOConfig.batched_copies``, ONE call ``closure(len(term_lists))`` whose batch dimension
        carries the copies (``core.batched``)."""
        if not self.config.batched_copies:
            out = []
            for terms in term_lists:
                out.append(self.loss(terms))
                if not math.isfinite(out[-1]):
                    break
            return out
        from .batched import BatchedCopies

        n = len(term_lists)
        self.perturber.restore(self.plan)  # the copies are built from the unperturbed weights
        with BatchedCopies(self.model, self.plan, term_lists, self.config):
            if self.rng is not None:
                self.rng.restore()
            value = self.closure(n)
        if not isinstance(value, torch.Tensor) or value.shape != (n,):
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(
                f"batched_copies: the closure, called with copies={n}, must return a tensor of shape ({n},) "
                f"holding each copy's loss (its batch repeated {n} times along dim 0); it returned {got}."
            )
        if value.requires_grad:
            raise ValueError("batched_copies: the closure returned losses that require grad; ZO needs none.")
        return [float(v) for v in value.detach().double().tolist()]

    def along(self, seed: int, coeff: float) -> list[tuple[int, float]]:
        """``coeff`` times the step's direction of ``seed`` as terms of the stream."""
        return [(seed, coeff * self.plan.coef(seed))]

    def loss_pair(
        self, terms_a: list[tuple[int, float]], terms_b: list[tuple[int, float]]
    ) -> tuple[float, float]:
        """(loss at theta + sum(terms_a), loss at theta + sum(terms_b)): in one pass over the
        model under the one-visit schedule (``core.dual``), else two forwards (the second is
        skipped when the first is not finite: its value is then NaN)."""
        units = self.perturber.dual_units
        if units is None or self.perturber.dual_off:
            la = self.loss(terms_a)
            return la, (self.loss(terms_b) if math.isfinite(la) else float("nan"))
        from .dual import DualRun, NotDual

        oop = [s for s in self.plan.active if not s.in_place]
        run = DualRun(units, oop, terms_a, terms_b, self.config, self.plan, same_masks=self.rng is not None)
        cpu_state = torch.get_rng_state()
        try:
            with run:
                if self.rng is not None:
                    self.rng.restore()
                value = as_float_loss(self.closure())
                if run.answered:  # the second half's outputs are ready: the closure computes its loss
                    pair = value, as_float_loss(self.closure())
                else:
                    pair = None
            pair = pair or run.pair(value)
            self.perturber.dual_ok = True
            return pair
        except Exception as e:  # noqa: BLE001 - the first pair decides whether the schedule applies
            if not isinstance(e, NotDual) and self.perturber.dual_ok:
                raise  # it worked before: a real error of the closure
            e = e if isinstance(e, NotDual) else NotDual(f"{type(e).__name__} in the doubled forward: {e}")
            self.perturber.dual_off = True
            logger.warning(
                "zo_plugins: the one-visit schedule does not apply (%s); falling back to one forward per "
                "perturbation.",
                e,
            )
            torch.set_rng_state(cpu_state)
            la = self.loss(terms_a)
            return la, (self.loss(terms_b) if math.isfinite(la) else float("nan"))

    def unperturbed_loss(self) -> float:
        self.perturber.restore(self.plan)
        return self.loss([])


# ----------------------------------------------------------------------------- spsa
def _spsa(p: Probe) -> None:
    est, eps = p.est, p.eps
    for seed in p.plan.seeds:
        # in place: +eps from theta, then -2eps from theta + eps*z; one-visit: both in one pass
        lp, lm = p.loss_pair(p.along(seed, eps), p.along(seed, -eps))
        est.losses_plus.append(lp)
        est.losses_minus.append(lm)
        if not (math.isfinite(lp) and math.isfinite(lm)):
            est.skipped = True
            return
        est.projected_grads.append(p.sign * (lp - lm) / (2 * eps))


# ----------------------------------------------------------------------------- forward
def _forward(p: Probe) -> None:
    est, eps = p.est, p.eps
    base = p.unperturbed_loss()
    for seed in p.plan.seeds:
        loss = p.loss(p.along(seed, eps))
        est.losses_plus.append(loss)
        est.losses_minus.append(base)  # the unperturbed loss, shared by all directions
        if not (math.isfinite(loss) and math.isfinite(base)):
            est.skipped = True
            return
        est.projected_grads.append(p.sign * (loss - base) / eps)


# ----------------------------------------------------------------------------- rank
def _rank(p: Probe) -> None:
    """ZO-RankSGD: d = sum over ranked pairs (better i, worse j) of (z_j - z_i) / #pairs,
    descending along -d.  Candidate j's coefficient is (2 p_j - m + 1) / (m (m - 1) / 2) with
    p_j its rank (0 = best).  With a ``ranking_oracle`` the candidates' raw outputs (e.g.
    generated text) are ranked by it and never converted to numbers."""
    est, seeds = p.est, p.plan.seeds
    m = len(seeds)
    outputs, losses = [], []
    for seed in seeds:
        out = p.output(p.along(seed, p.eps))
        if p.ranking_oracle is None:
            loss = as_float_loss(out)
            losses.append(loss)
            if not math.isfinite(loss):
                est.losses_plus, est.skipped = losses, True
                return
        else:
            outputs.append(out)
    if p.ranking_oracle is not None:
        order = [int(i) for i in p.ranking_oracle(outputs)]
        if sorted(order) != list(range(m)):
            raise ValueError(
                f"ranking_oracle must return a permutation of range({m}) (best first); got {order}."
            )
        est.outputs = outputs
    else:
        order = sorted(range(m), key=lambda j: p.sign * losses[j])
    est.losses_plus = losses or [float("nan")] * m
    est.losses_minus = [float("nan")] * m
    pairs = m * (m - 1) / 2
    coef = [0.0] * m
    for rank, j in enumerate(order):
        coef[j] = (2 * rank - m + 1) / pairs
    est.projected_grads = [m * c for c in coef]  # the update divides by n_queries


# ----------------------------------------------------------------------------- forward-grad
def _forward_grad(p: Probe) -> None:
    import torch.autograd.forward_ad as fwAD
    from torch.nn.attention import SDPBackend, sdpa_kernel

    est = p.est
    for seed in p.plan.seeds:
        # the fused CPU/flash attention kernels have no forward-AD formula; the math one has
        with fwAD.dual_level(), sdpa_kernel(SDPBackend.MATH), p.perturber.dual(p.plan, p.along(seed, 1.0)):
            if p.rng is not None:
                p.rng.restore()
            out = p.closure()
            if not isinstance(out, torch.Tensor) or out.numel() != 1:
                raise ValueError("estimator='forward-grad' needs the closure to return a scalar loss tensor.")
            primal, tangent = fwAD.unpack_dual(out)
            loss = float(primal.detach().item())
            deriv = float(tangent.item()) if tangent is not None else 0.0
        est.losses_plus.append(loss)
        est.losses_minus.append(loss)
        if not (math.isfinite(loss) and math.isfinite(deriv)):
            est.skipped = True
            return
        est.projected_grads.append(p.sign * deriv)


# ----------------------------------------------------------------------------- fzoo
def _fzoo(p: Probe) -> None:
    """FZOO (Dang et al., ICLR 2026): the unperturbed loss l_0 and N one-sided probes
    l_i = L(θ + ε z_i).  The projected gradients are the forward differences (l_i - l_0)/ε;
    ``_fzoo_normalise`` divides them by their spread once the step's are accumulated and
    all-reduced, which makes the update -lr/N Σ_i (l_i - l_0)/σ z_i with σ the (population)
    standard deviation of the N probed losses."""
    est, eps = p.est, p.eps
    lists = [[]] + [p.along(seed, eps) for seed in p.plan.seeds]
    losses = p.losses(lists)
    base, probed = losses[0], losses[1:]
    est.losses_plus = list(probed)
    est.losses_minus = [base] * len(probed)
    if len(losses) < len(lists) or not all(math.isfinite(v) for v in losses):
        est.skipped = True
        return
    est.projected_grads = [p.sign * (v - base) / eps for v in probed]


def _fzoo_normalise(grads: list[float], config: ZOConfig) -> list[float]:
    """g_i / std(g): the spread of (l_i - l_0)/ε is σ/ε, so g_i / std(g) = (l_i - l_0)/σ; the
    normalised coefficients have population standard deviation exactly 1.  All-equal
    coefficients (σ = 0: the loss did not tell the directions apart) give a zero step."""
    n = len(grads)
    mean = math.fsum(grads) / n
    sd = math.sqrt(math.fsum((g - mean) ** 2 for g in grads) / n)
    if not (sd > 0 and math.isfinite(sd)):
        return [0.0] * n
    return [g / sd for g in grads]


def _fzoo_validate(cfg: ZOConfig) -> None:
    if cfg.n_queries < 2:
        raise ValueError(
            f"estimator='fzoo' normalises by the spread of n_queries probed losses; n_queries="
            f"{cfg.n_queries} has none: use n_queries >= 2 (the paper uses 8)."
        )


# ----------------------------------------------------------------------------- hizoo
def _hizoo(p: Probe) -> None:
    """HiZOO (Zhao et al., ICLR 2025): L(θ), L(θ + ε H^-1/2 z), L(θ - ε H^-1/2 z) per direction
    (the passes apply the preconditioner H^-1/2 through ``ParamSpec.scale``).  The projected
    gradients are the n central differences g = (L+ - L-)/2ε followed by the n curvatures
    c = (L+ + L- - 2L)/(2ε²), which the 'hizoo' rule turns into the diagonal estimate."""
    est, eps = p.est, p.eps
    base = p.unperturbed_loss()
    grads, curvs = [], []
    for seed in p.plan.seeds:
        lp = p.loss(p.along(seed, eps))
        lm = p.loss(p.along(seed, -eps)) if math.isfinite(lp) else float("nan")
        est.losses_plus.append(lp)
        est.losses_minus.append(lm)
        if not all(math.isfinite(v) for v in (lp, lm, base)):
            est.skipped = True
            return
        grads.append(p.sign * (lp - lm) / (2 * eps))
        curvs.append(p.sign * (lp + lm - 2 * base) / (2 * eps * eps))
    est.projected_grads = grads + curvs


def _hizoo_validate(cfg: ZOConfig) -> None:
    if cfg.optimizer != "hizoo":
        raise ValueError(
            f"estimator='hizoo' probes for the 'hizoo' update rule (it returns gradients and "
            f"curvatures): use optimizer='hizoo', not {cfg.optimizer!r}."
        )


# ----------------------------------------------------------------------------- cge
def cge_coordinates(plan: StepPlan, config: ZOConfig) -> list[tuple[ParamSpec, int]]:
    """The coordinates ``cge`` estimates at this step, drawn from the step seed (cached in the
    plan: the estimate and the update use the same ones)."""

    def draw() -> list[tuple[ParamSpec, int]]:
        specs = [sp for sp in plan.active if sp.param.numel()]
        sizes = [sp.param.numel() for sp in specs]
        gen = torch.Generator().manual_seed(mix64(step_seed(config.seed, plan.step), 0xC6E) >> 1)
        picks = torch.randint(0, sum(sizes), (config.cge_coordinates,), generator=gen).tolist()
        bounds = torch.tensor(sizes).cumsum(0).tolist()
        out = []
        for g in picks:
            k = next(i for i, b in enumerate(bounds) if g < b)
            out.append((specs[k], g - (bounds[k - 1] if k else 0)))
        return out

    return plan.cached("cge_coordinates", draw)


def _cge(p: Probe) -> None:
    """DeepZero's coordinate-wise estimate: each sampled coordinate i is set to
    theta_i +/- eps (the original value is saved, so restore is exact in every dtype) and
    g_i = (L+ - L-) / (actual difference of the two stored values)."""
    est, eps = p.est, p.eps
    for spec, i in cge_coordinates(p.plan, p.config):
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
                if p.rng is not None:
                    p.rng.restore()
                losses.append(as_float_loss(p.closure()))
        finally:
            flat[i] = orig
        est.losses_plus.append(losses[0])
        est.losses_minus.append(losses[1])
        if not all(math.isfinite(v) for v in losses) or vals[0] == vals[1]:
            est.skipped = True
            return
        est.projected_grads.append(p.sign * (losses[0] - losses[1]) / (vals[0] - vals[1]))


register_estimator(
    Estimator("spsa", _spsa, help="two-point central difference (L(θ+εz) - L(θ-εz)) / 2ε (MeZO)")
)
register_estimator(
    Estimator(
        "forward",
        _forward,
        forwards_per_step=lambda cfg: cfg.n_queries + 1,
        help="one-point forward difference (L(θ+εz) - L(θ)) / ε, the unperturbed loss shared",
    )
)
register_estimator(
    Estimator(
        "forward-grad",
        _forward_grad,
        forwards_per_step=lambda cfg: cfg.n_queries,
        unperturbed_weights=True,
        help="the exact directional derivative ∇L·z by forward-mode AD",
    )
)
register_estimator(
    Estimator(
        "cge",
        _cge,
        grads_per_step=lambda cfg: cfg.cge_coordinates,
        forwards_per_step=lambda cfg: 2 * cfg.cge_coordinates,
        coordinate_update=True,
        help="coordinate-wise estimation (DeepZero) of cge_coordinates random coordinates",
    )
)
register_estimator(
    Estimator(
        "fzoo",
        _fzoo,
        forwards_per_step=lambda cfg: cfg.n_queries + 1,
        finalize=_fzoo_normalise,
        validate=_fzoo_validate,
        batched_copies=True,
        help="FZOO: n_queries one-sided probes L(θ+εz_i) and L(θ); the step divided by their spread",
    )
)
register_estimator(
    Estimator(
        "hizoo",
        _hizoo,
        grads_per_step=lambda cfg: 2 * cfg.n_queries,
        forwards_per_step=lambda cfg: 2 * cfg.n_queries + 1,
        validate=_hizoo_validate,
        help="HiZOO's probes L(θ), L(θ ± ε H^-1/2 z): gradients and curvatures for optimizer='hizoo'",
    )
)
register_estimator(
    Estimator(
        "rank",
        _rank,
        forwards_per_step=lambda cfg: cfg.n_queries,
        help="ZO-RankSGD: only the ranking of n_queries candidates θ+εz_j is used",
    )
)
