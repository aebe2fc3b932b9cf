"""Which schedule a ``ZOOptimizer`` runs, and the updates it leaves to offloaded blocks.

``resolve_schedule`` picks ``'per-forward'`` (one forward per perturbation, the in-memory
default) or ``'one-visit'`` (both perturbed forwards of a step in one pass over the model,
``core.dual``; the default with offload), refuses the configurations the one-visit pass cannot
serve -- before any weight changes -- and attaches the model's ``BlockOffload``
(``core.offload``).

``Deferred`` holds the update passes of offloaded tensors: their block is not resident when
the step ends, so each update runs when the block next arrives (``BlockOffload.defer``), is
saved with the optimizer's state until then, and is queued again on load.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from ..config import ZOConfig
from .backend import Passes
from .offload import BlockOffload
from .passes import ParamSpec

__all__ = ["resolve_schedule", "Deferred"]


def _refuse(cfg: ZOConfig, model: nn.Module | None, specs: Sequence[ParamSpec], quantized) -> None:
    what = f"schedule='one-visit'{' / offload' if cfg.offload else ''}"
    if model is None:
        raise ValueError(f"{what} needs the model: use ZOOptimizer(model, ...).")
    if cfg.estimator != "spsa":
        raise ValueError(
            f"schedule='one-visit' (and offload) pairs the +eps and -eps forwards of estimator='spsa'; "
            f"estimator={cfg.estimator!r} evaluates other points: use schedule='per-forward' without offload."
        )
    inplace = [s.name for s in specs if s.in_place]
    if inplace:
        raise ValueError(
            f"schedule='one-visit' perturbs out of place; {inplace[0]!r} is set to be perturbed in place "
            "(perturbation='in-place'): use perturbation='auto' or 'out-of-place'."
        )
    if quantized.scales:
        raise ValueError(
            f"{what} cannot run a quantized model ({len(quantized.scales)} quantized layers, e.g. "
            f"{quantized.scales[0].name!r}): the quantized layers' own tensor types are not streamed. "
            "Use schedule='per-forward' (the default without offload) -- a 4-bit model is already a "
            "fraction of its float size."
        )
    if any(s.source is not None for s in specs):
        raise ValueError(
            f"{what} cannot run on FSDP2 shards: FSDP gathers each group for one forward at a time. "
            "Use schedule='per-forward' (the default without offload) with fully_shard, or offload "
            "without sharding."
        )


def resolve_schedule(
    cfg: ZOConfig, model: nn.Module | None, specs: Sequence[ParamSpec], quantized, perturber
) -> tuple[str, BlockOffload | None]:
    """``(schedule, offload)``: the schedule ``cfg.schedule`` resolves to, and the model's block
    offload when ``cfg.offload`` is set (one per model: a second optimizer on it shares it).
    For 'one-visit' the perturber gets the model's dual units."""
    schedule = cfg.schedule
    if schedule == "auto":
        schedule = "one-visit" if cfg.offload else "per-forward"
    if schedule == "per-forward":
        return schedule, None
    _refuse(cfg, model, specs, quantized)
    from .dual import DualUnits, NotDual
    from .offload import find_blocks

    _, blocks = find_blocks(model)
    try:
        perturber.dual_units = DualUnits(model, blocks)
    except NotDual as e:
        raise ValueError(f"schedule='one-visit' cannot run this model: {e}") from None
    offload = None
    if cfg.offload:
        existing = getattr(model, "_zo_offload", None)
        if isinstance(existing, BlockOffload) and existing.mode == cfg.offload:
            offload = existing
        else:
            offload = BlockOffload(model, cfg.offload, cfg.offload_dir)
            model._zo_offload = offload  # type: ignore[attr-defined]
    return schedule, offload


class Deferred:
    """The update passes of offloaded tensors not applied yet, by tensor name."""

    def __init__(self, offload: BlockOffload | None, passes: Callable[[], Passes]) -> None:
        self.offload = offload
        self.passes = passes  # the optimizer's passes when the update was queued
        self.pending: dict[str, dict[str, Any]] = {}

    def add(self, spec: ParamSpec, kwargs: dict[str, Any]) -> None:
        """Queue ``spec``'s update pass (``Passes.update`` keywords) for its block's next arrival."""
        self.pending[spec.name] = kwargs
        passes = self.passes()

        def apply(sp: ParamSpec, kw=kwargs) -> None:
            if self.pending.get(sp.name) is kw:
                del self.pending[sp.name]
            passes.update(sp, restore=[], **kw)

        self.offload.defer(spec, apply)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: dict(kw, update=[[str(s), c] for s, c in kw["update"]]) for name, kw in self.pending.items()
        }

    def load_state_dict(self, saved: dict[str, Any], specs: Sequence[ParamSpec]) -> None:
        if not saved:
            return
        if self.offload is None:
            raise ValueError(
                "This checkpoint holds updates of offloaded blocks not yet applied; load it into an "
                "optimizer with the same ZOConfig.offload."
            )
        by_name = {s.name: s for s in specs}
        for name, kw in saved.items():
            self.add(by_name[name], dict(kw, update=[(int(s), float(c)) for s, c in kw["update"]]))
