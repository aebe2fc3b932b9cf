"""The registries of the core: estimators and update rules by name, and the backend names.

A leaf module (it imports nothing of zo_plugins), so ``ZOConfig`` can validate its choices
against what is registered without depending on the modules that implement them: the
built-ins register themselves when ``core.estimators`` / ``core.updates`` are imported (the
package does so), and a user's ``register_estimator`` / ``register_update_rule`` call makes a
new name valid everywhere -- ``ZOConfig``, ``ZOOptimizer``, the HF and Lightning paths,
``zo-train`` YAML.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "BACKENDS",
    "Estimator",
    "ESTIMATORS",
    "register_estimator",
    "get_estimator",
    "UpdateRule",
    "UPDATE_RULES",
    "register_update_rule",
    "get_update_rule",
]

BACKENDS = ("auto", "triton", "torch")
"""``ZOConfig.backend`` choices (``core.backend`` implements them)."""


@dataclass(frozen=True)
class Estimator:
    """A registered estimator: ``probe(Probe)`` evaluates the closure at perturbed weights and
    fills ``Probe.est`` (``core.estimators`` documents the contract and holds the built-ins)."""

    name: str
    probe: Callable[[Any], None]
    grads_per_step: Callable[[Any], int] = field(default=lambda cfg: cfg.n_queries)
    """Projected gradients per step: the length of what is all-reduced and updated along."""
    forwards_per_step: Callable[[Any], int] = field(default=lambda cfg: 2 * cfg.n_queries)
    unperturbed_weights: bool = False
    """Every pass must see the unperturbed weights (forces out-of-place perturbation)."""
    coordinate_update: bool = False
    """The projected gradients are per coordinate (``cge``), not per direction."""
    help: str = ""
    finalize: Callable[[list[float], Any], list[float]] | None = None
    """``finalize(grads, config) -> grads``: applied to a step's projected gradients once they
    are accumulated over micro-batches and all-reduced, before clipping and the update (FZOO's
    normalisation by the spread of the probed losses).  Trajectories record its output."""
    validate: Callable[[Any], None] | None = None
    """``validate(config)``: raise ``ValueError`` for settings the estimator cannot serve
    (``ZOConfig`` calls it, before any weight changes)."""
    batched_copies: bool = False
    """It can evaluate its probes in one closure call whose batch carries the copies
    (``ZOConfig.batched_copies``; ``Probe.losses``)."""


ESTIMATORS: dict[str, Estimator] = {}


def register_estimator(est: Estimator) -> Estimator:
    """Add ``est`` to the registry (``ZOConfig.estimator`` then accepts its name)."""
    if not isinstance(est, Estimator):
        raise TypeError(f"register_estimator takes an Estimator, not {type(est).__name__}.")
    if est.name in ESTIMATORS:
        raise ValueError(f"An estimator named {est.name!r} is already registered.")
    ESTIMATORS[est.name] = est
    return est


def get_estimator(name: str) -> Estimator:
    try:
        return ESTIMATORS[name]
    except KeyError:
        raise ValueError(
            f"Unknown estimator {name!r}: registered are {', '.join(map(repr, ESTIMATORS))}."
        ) from None


@dataclass(frozen=True)
class UpdateRule:
    """A registered update rule.

    ``pass_rule(config)``: the fused rule pass that applies it (``"sign"``, ``"momentum"``,
    ``"adam"``: ``rule_update_`` / the Triton rule kernel) or ``None`` for the linear update
    pass along the step's terms.  ``state_bytes(config)``: float32 state per trainable
    parameter.  ``accept(opt, plan, grads, probe, baseline)``: called before the update when
    given; False rejects the step (the weights are left as they were).

    A rule may bring its own pass instead: ``apply(opt, plan, grads, restore, groups)`` then
    applies the update (``restore``: the terms undoing a pending in-place perturbation,
    ``groups``: ``(lr, weight_decay, specs)`` per param group); such a rule runs on the PyTorch
    passes.  ``direction_scale(opt, spec)`` may return a per-element factor of the step's
    directions, ``scale(start, n) -> tensor``, that every probe of the step applies (HiZOO's
    preconditioner), or None.  ``validate(config)`` raises ``ValueError`` for settings the
    rule cannot serve."""

    name: str
    pass_rule: Callable[[Any], str | None]
    state_bytes: Callable[[Any], int]
    accept: Callable[..., bool] | None = None
    help: str = ""
    apply: Callable[..., None] | None = None
    direction_scale: Callable[[Any, Any], Callable[[int, int], Any] | None] | None = None
    validate: Callable[[Any], None] | None = None


UPDATE_RULES: dict[str, UpdateRule] = {}


def register_update_rule(rule: UpdateRule) -> UpdateRule:
    """Add ``rule`` to the registry (``ZOConfig.optimizer`` then accepts its name)."""
    if not isinstance(rule, UpdateRule):
        raise TypeError(f"register_update_rule takes an UpdateRule, not {type(rule).__name__}.")
    if rule.name in UPDATE_RULES:
        raise ValueError(f"An update rule named {rule.name!r} is already registered.")
    UPDATE_RULES[rule.name] = rule
    return rule


def get_update_rule(name: str) -> UpdateRule:
    try:
        return UPDATE_RULES[name]
    except KeyError:
        raise ValueError(
            f"Unknown update rule {name!r}: registered are {', '.join(map(repr, UPDATE_RULES))}."
        ) from None
