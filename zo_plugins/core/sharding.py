"""Zeroth-order steps on sharded parameters: FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 every trainable parameter is a ``DTensor`` whose local tensor (``p.to_local()``)
holds this rank's rows (dim-0 sharding); FSDP all-gathers a group's shards into plain
tensors just before the group's module runs and frees them after.  A ZO step here

* **updates only the local shard**, drawing the directions at the shard's global element
  offsets (``ParamSpec.offset`` / ``full_numel``): the streams are counter-based, so a shard
  gets exactly its slice of the unsharded direction and the update of every element is the
  arithmetic of the unsharded run -- the sharded run's weights equal the unsharded run's bit
  for bit (tested, 2 ranks, gloo);
* **perturbs out of place by default** (``perturbation='auto'`` / ``'out-of-place'``): a
  forward pre-hook placed *before* FSDP's own writes ``theta + eps*z`` into the local shard
  (this rank generates only its slice of z), FSDP all-gathers the perturbed shards, and a
  pre-hook placed *after* FSDP's puts the saved shard back bit for bit.  The gathered copy
  the module computes with equals the unsharded run's perturbed copy exactly, and the stored
  weights are unperturbed whenever a module is not being gathered.  Where the gathered copy
  turns out to hold the unperturbed values (forward prefetching configured with
  ``set_modules_to_forward_prefetch`` issues the all-gather before the module's hooks run;
  checked on every tensor against this rank's slice), the gathered copy itself is perturbed
  -- exact too, at the cost of generating the whole tensor's direction on every rank;
* **in place** on request (``perturbation='in-place'``, float32/float64): the local shards are
  shifted by +eps z / -2eps z like unsharded in-place runs (restore within an ulp), and every
  group is resharded before each forward so FSDP gathers the shifted shards.

FSDP2 keeps the root module's parameters gathered after a forward (training would gather
them again for backward at once); ZO never runs a backward, so the perturber reshards every
FSDP module before and after each perturbed forward, and before an update pass -- a gathered
copy never outlives the weights it was gathered from.

ZO memory per rank: the model divided by the number of shards, plus FSDP's one gathered
group at a time, plus (out of place) a copy of one group's local shards.

Not supported on sharded parameters, refused up front with the reason: ``estimator='cge'``
and ``'forward-grad'``, ``distribution='sphere'``, magnitude sparsity, ``mask_fn``,
trajectory logs, perturbation parallelism, FSDP1's ``FlatParameter`` and non-dim-0 shardings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from .params import model_names
from .passes import ParamSpec
from .perturbation import Perturber
from .plan import StepPlan

__all__ = [
    "is_sharded",
    "fsdp_modules",
    "reshard_all",
    "prepare_model",
    "localize_specs",
    "check_sharded_config",
    "ShardedPerturber",
    "make_perturber",
]

logger = logging.getLogger("zo_plugins")

Term = tuple[int, float]

_UNSUPPORTED_ESTIMATORS = {
    "cge": "it picks coordinates by their index in the whole trainable set, which a shard does not hold",
    "forward-grad": "forward-mode AD needs dual tensors in place of FSDP's gathered parameters",
}


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def is_sharded(t: Any) -> bool:
    """True for a ``DTensor`` (an FSDP2 / tensor-parallel parameter)."""
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def _fsdp_module_type() -> type | None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return None
    return FSDPModule


def fsdp_modules(model: nn.Module | None) -> list[nn.Module]:
    """The modules of ``model`` that ``fully_shard`` was applied to (FSDP2), outermost first."""
    cls = _fsdp_module_type()
    if model is None or cls is None:
        return []
    return [m for m in model.modules() if isinstance(m, cls)]


def reshard_all(modules: Iterable[nn.Module]) -> None:
    """``FSDPModule.reshard()`` on every module: the gathered copies are freed and the sharded
    parameters registered again (a no-op for a group that is sharded already)."""
    for m in modules:
        m.reshard()


def _check_no_flat_parameters(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FlatParameter, FullyShardedDataParallel
    except ImportError:  # pragma: no cover
        return
    flat = [n for n, p in model.named_parameters() if isinstance(p, FlatParameter)]
    flat += [n or "<root>" for n, m in model.named_modules() if isinstance(m, FullyShardedDataParallel)]
    if flat:
        raise ValueError(
            f"ZOOptimizer found FSDP1 ({flat[0]!r}): FullyShardedDataParallel (FSDP1) "
            "concatenates a module's tensors into one flat buffer, so a tensor's name, shape and padding rows "
            "are lost and a shard does not start at a row. Shard with FSDP2 instead "
            "(torch.distributed.fsdp.fully_shard; in Lightning, zo_plugins.lightning.ZOModelParallelStrategy; "
            "in accelerate, fsdp_version: 2)."
        )


def prepare_model(model: nn.Module | None) -> list[nn.Module]:
    """Before the optimizer reads ``model``'s parameters: refuse FSDP1, and reshard FSDP2 groups
    (the root group stays gathered after a forward, and its gathered tensors are not the
    parameters the optimizer must hold).  Returns the FSDP2 modules."""
    if model is None:
        return []
    _check_no_flat_parameters(model)
    mods = fsdp_modules(model)
    reshard_all(mods)
    return mods


def _dim0_layout(p: torch.Tensor, name: str) -> tuple[int, int]:
    """(first global row, local rows) of this rank's shard of the DTensor ``p``; raises for a
    layout whose local data is not one contiguous run of rows of the whole tensor."""
    from torch.distributed.tensor import Replicate, Shard

    placements = tuple(p.placements)
    if not all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim == 0) for pl in placements):
        raise ValueError(
            f"Parameter {name!r} is a DTensor with placements {placements}: ZO on sharded parameters supports "
            "FSDP2's dim-0 sharding (Shard(0), and Replicate for HSDP) only, where this rank's data is a run of "
            "whole rows. Use fully_shard without a custom shard_placement_fn."
        )
    local = p.to_local()
    if p.dim() == 0:
        return 0, 0
    try:
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, placements)
        row0, rows = int(offset[0]), int(shape[0])
    except ImportError:  # pragma: no cover - the private helper moved: torch.chunk semantics
        from torch.distributed.tensor import Shard as _Shard

        row0, rows = 0, p.shape[0]
        for dim, pl in enumerate(placements):
            if isinstance(pl, _Shard):
                n, k = p.device_mesh.size(dim), p.device_mesh.get_local_rank(dim)
                chunk = math.ceil(rows / n)
                lo = min(k * chunk, rows)
                row0, rows = row0 + lo, min(chunk, rows - lo)
    if tuple(local.shape) != (rows, *p.shape[1:]):
        raise ValueError(
            f"Parameter {name!r}: the local shard has shape {tuple(local.shape)} but its layout says "
            f"{(rows, *p.shape[1:])}; ZO cannot place its directions."
        )
    return row0, rows


def localize_specs(specs: Sequence[ParamSpec]) -> list[ParamSpec]:
    """Replace each sharded (``DTensor``) parameter's spec by one over its local shard: the
    global element offset and size for the directions, the frozen rows that fall in the
    shard (as local rows), the DTensor as ``source`` (the optimizer's state is keyed by it)."""
    out = []
    for spec in specs:
        p = spec.param
        if not is_sharded(p):
            out.append(spec)
            continue
        row0, rows = _dim0_layout(p, spec.name)
        with torch.no_grad():
            local = p.to_local()
        if not local.is_contiguous():
            raise ValueError(
                f"Parameter {spec.name!r}: its local shard is not contiguous; ZO passes need it so."
            )
        row_len = p.numel() // max(p.shape[0], 1) if p.dim() else 1
        frozen = tuple(r - row0 for r in spec.frozen_rows if row0 <= r < row0 + rows)
        out.append(
            ParamSpec(
                local,
                spec.name,
                spec.key,
                frozen,
                in_place=spec.in_place,
                watch_grad=spec.watch_grad,
                offset=row0 * row_len,
                full_numel=p.numel(),
                source=p,
            )
        )
    return out


def check_sharded_config(
    config: ZOConfig,
    specs: Sequence[ParamSpec],
    *,
    estimator: str,
    mask_fn: Callable | None,
    model: nn.Module | None,
) -> None:
    """Refuse, before any weight changes, what cannot run on sharded parameters."""
    sharded = [s for s in specs if s.source is not None]
    if not sharded:
        return
    what = f"sharded (FSDP2) parameters such as {sharded[0].name!r}"
    if model is None or not fsdp_modules(model):
        raise ValueError(
            f"ZOOptimizer got {what} but no FSDP2 model: pass the module fully_shard was applied to "
            "(ZOOptimizer(model, ...) or ZOOptimizer(params, ..., model=model)); a DTensor outside FSDP2 "
            "(tensor parallelism) is not supported."
        )
    if estimator in _UNSUPPORTED_ESTIMATORS:
        raise ValueError(
            f"estimator={estimator!r} cannot run on {what}: {_UNSUPPORTED_ESTIMATORS[estimator]}. "
            "Use 'spsa' (MeZO), 'forward' or 'rank'."
        )
    if config.distribution == "sphere":
        raise ValueError(
            f"distribution='sphere' cannot run on {what}: its scale is the norm of the whole direction, "
            "which no rank holds. Use 'gaussian' or 'rademacher'."
        )
    if config.sparsity and config.sparsity_mode == "magnitude":
        raise ValueError(
            f"sparsity_mode='magnitude' cannot run on {what}: its threshold is a quantile of the whole "
            "tensor's magnitudes. Use sparsity_mode='random' (drawn per element, exact on shards)."
        )
    if mask_fn is not None:
        raise ValueError(f"mask_fn cannot run on {what}: it returns a mask of the whole tensor's shape.")
    if config.trajectory_path is not None:
        raise ValueError(
            f"trajectory_path cannot be recorded on {what}: every rank holds different weights. Record from an "
            "unsharded run."
        )
    if getattr(config, "perturbation_parallel", False):
        raise ValueError(
            f"perturbation_parallel=True cannot run on {what}: pairs of ranks would need the same shards. "
            "Use one or the other."
        )
    if config.backend == "triton":
        raise ValueError(
            f"backend='triton' cannot run on {what}: the kernels draw each tensor's directions from its element "
            "0. Use backend='auto' or 'torch'."
        )


class ShardedPerturber(Perturber):
    """``Perturber`` for a model with FSDP2 groups (see the module docstring)."""

    def __init__(
        self,
        model: nn.Module | None,
        config: ZOConfig,
        on_shift: Callable[[list[Term]], None] | None = None,
    ) -> None:
        super().__init__(model, config, on_shift)
        self.fsdp = fsdp_modules(model)
        self.frozen = model_names(model)[1]
        """Frozen (padding) rows of each sharded parameter, as global rows (by id of the DTensor)."""
        self._prefetch = _forward_prefetch_configured(self.fsdp)
        self.fell_back: set[str] = set()
        """Tensors whose gathered copy was perturbed (FSDP gathered them before the hooks ran)."""

    def reshard(self) -> None:
        reshard_all(self.fsdp)

    @contextmanager
    def perturbed(self, plan: StepPlan, terms: list[Term]):
        self.reshard()  # no gathered copy of other weights may serve this forward
        try:
            if any(s.in_place for s in plan.active):
                self.shift(plan, terms)
            oop = [s for s in plan.active if not s.in_place]
            plain = [s for s in oop if s.source is None]
            sharded = [s for s in oop if s.source is not None]
            with self._plain(plan, plain, terms), self._gathered(plan, sharded, terms):
                yield
        finally:
            self.reshard()  # free the gathered (perturbed) copies

    @contextmanager
    def _plain(self, plan: StepPlan, specs: list[ParamSpec], terms: list[Term]):
        if not specs:
            yield
            return
        with self._out_of_place(specs, terms, plan.stream, copy=plan.passes.copy):
            yield

    @contextmanager
    def _gathered(self, plan: StepPlan, specs: list[ParamSpec], terms: list[Term]):
        if not specs:
            yield
            return
        with _GatheredPerturbation(self, plan, specs, terms):
            yield

    def take_pending(self) -> list[Term]:
        self.reshard()  # an update pass follows: no gathered copy may outlive it
        return super().take_pending()

    @contextmanager
    def dual(self, plan: StepPlan, terms: list[Term]):  # pragma: no cover - refused up front
        raise RuntimeError("internal: forward-mode AD on sharded parameters")
        yield


def make_perturber(
    model: nn.Module | None, config: ZOConfig, specs: Sequence[ParamSpec], on_shift=None
) -> Perturber:
    """The perturber for ``specs``: ``ShardedPerturber`` when some are FSDP2 shards."""
    if any(s.source is not None for s in specs) or fsdp_modules(model):
        return ShardedPerturber(model, config, on_shift)
    return Perturber(model, config, on_shift)


def _forward_prefetch_configured(mods: Sequence[nn.Module]) -> bool:
    for m in mods:
        state = m._get_fsdp_state() if hasattr(m, "_get_fsdp_state") else None
        if getattr(state, "_states_to_forward_prefetch", None):
            return True
    return False


class _GatheredPerturbation:
    """The out-of-place perturbation of FSDP2 groups for one forward (module docstring).

    For every FSDP module ``F`` and the trainable tensors of its group (those of ``F``'s
    subtree that no nested FSDP module owns): before FSDP's pre-hook, each local shard is
    saved and overwritten by ``theta + sum(terms)``; after FSDP's pre-hook, the gathered tensor
    is checked to hold this rank's perturbed slice, the saved shard is put back, and where the
    check fails (or the tensor was gathered already) the gathered copy is perturbed instead.
    After ``F``'s forward, tensors FSDP resharded are marked, so a second gathering in the same
    forward is perturbed again."""

    def __init__(self, owner: ShardedPerturber, plan: StepPlan, specs: Sequence[ParamSpec], terms) -> None:
        self.owner, self.plan, self.terms = owner, plan, list(terms)
        self.copy = plan.passes.copy
        self.kw = dict(distribution=plan.stream, chunk_size=plan.chunk_size)
        by_source = {id(s.source): s for s in specs}
        self.groups = _group_entries(owner.model, owner.fsdp, by_source)
        self.specs = list(specs)
        self.saved: dict[int, torch.Tensor] = {}  # id(spec) -> the unperturbed local shard
        self.done: dict[int, torch.Tensor] = {}  # id(spec) -> the gathered tensor holding theta + eps z
        self.visited: set[int] = set()
        self.handles: list[Any] = []
        self._full: dict[int, ParamSpec] = {}

    # -------------------------------------------------------------- the hooks
    def _before(self, fsdp_module: nn.Module, args: Any, kwargs: Any = None) -> None:
        if self.owner._prefetch:  # the all-gather may have read the shards already
            return
        with torch.no_grad():
            for mod, attr, spec in self.groups.get(fsdp_module, ()):
                if id(spec) in self.saved or id(spec) in self.done or not is_sharded(mod._parameters[attr]):
                    continue
                local = spec.param
                self.saved[id(spec)] = local.clone()
                local.copy_(self.copy(spec, self.terms, **self.kw))

    def _after(self, fsdp_module: nn.Module, args: Any, kwargs: Any = None) -> None:
        with torch.no_grad():
            for mod, attr, spec in self.groups.get(fsdp_module, ()):
                gathered = mod._parameters[attr]
                saved = self.saved.pop(id(spec), None)
                if is_sharded(gathered):  # not gathered here: put the shard back, perturb when gathered
                    if saved is not None:
                        spec.param.copy_(saved)
                    continue
                if self.done.get(id(spec)) is gathered:
                    continue
                ok = False
                if saved is not None:
                    flat = gathered.detach().reshape(-1)
                    mine = flat[spec.offset : spec.offset + spec.param.numel()]
                    ok = torch.equal(mine, spec.param.reshape(-1).to(mine))
                    spec.param.copy_(saved)
                if not ok:
                    if spec.name not in self.owner.fell_back:
                        self.owner.fell_back.add(spec.name)
                        logger.info(
                            "zo_plugins: FSDP gathered %r before the ZO hooks ran (forward prefetching?): "
                            "perturbing the gathered copy (exact; every rank generates the whole direction).",
                            spec.name,
                        )
                    gathered.copy_(self.copy(self._full_spec(spec, gathered), self.terms, **self.kw))
                self.done[id(spec)] = gathered
                self.visited.add(id(spec))

    def _post(self, fsdp_module: nn.Module, args: Any, output: Any) -> None:
        for mod, attr, spec in self.groups.get(fsdp_module, ()):
            if is_sharded(mod._parameters[attr]):
                self.done.pop(id(spec), None)  # resharded: a later gathering must be perturbed again

    def _full_spec(self, spec: ParamSpec, gathered: torch.Tensor) -> ParamSpec:
        """A spec over the whole gathered tensor (global frozen rows, global mask)."""
        frozen = self.owner.frozen.get(id(spec.source), ())
        full = ParamSpec(gathered.detach(), spec.name, spec.key, frozen, in_place=False)
        if spec.mask is not None:
            from .sparsity import sparsity_mask

            full.mask = sparsity_mask(full, self.owner.config, self.plan.step)
        return full

    # -------------------------------------------------------------- context
    def __enter__(self) -> _GatheredPerturbation:
        for fsdp_module in self.groups:
            self.handles.append(fsdp_module.register_forward_pre_hook(self._before, prepend=True))
            self.handles.append(fsdp_module.register_forward_pre_hook(self._after))
            self.handles.append(fsdp_module.register_forward_hook(self._post, always_call=True))
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for h in self.handles:
            h.remove()
        with torch.no_grad():
            for spec in self.specs:  # a forward that raised between the two pre-hooks
                saved = self.saved.pop(id(spec), None)
                if saved is not None:
                    spec.param.copy_(saved)
        if exc_type is None:
            missing = [s.name for s in self.specs if id(s) not in self.visited]
            if missing:
                raise RuntimeError(
                    f"Out-of-place perturbation never reached {missing[:3]}"
                    f"{' and more' if len(missing) > 3 else ''}: FSDP never gathered these parameters during "
                    "the forward. Freeze them (requires_grad=False) so they are not trained."
                )


def _group_entries(
    model: nn.Module, fsdp: Sequence[nn.Module], by_source: dict[int, ParamSpec]
) -> dict[nn.Module, list[tuple[nn.Module, str, ParamSpec]]]:
    """FSDP module -> the (owner module, attribute, spec) of the trainable tensors of its group:
    those of its subtree not below a nested FSDP module."""
    fsdp_set = set(fsdp)
    groups: dict[nn.Module, list[tuple[nn.Module, str, ParamSpec]]] = {}
    found: set[int] = set()

    def walk(module: nn.Module, root: nn.Module) -> None:
        for attr, p in module._parameters.items():
            spec = by_source.get(id(p)) if p is not None else None
            if spec is not None:
                groups.setdefault(root, []).append((module, attr, spec))
                found.add(id(spec))
        for child in module.children():
            walk(child, child if child in fsdp_set else root)

    for top in fsdp:
        if not any(top is not other and _is_descendant(top, other) for other in fsdp):
            walk(top, top)
    lost = [s.name for s in by_source.values() if id(s) not in found]
    if lost:
        raise ValueError(
            f"Sharded parameters {lost[:3]} belong to no FSDP2 module of the model: apply fully_shard to the "
            "model (the root) as well as to its blocks."
        )
    return groups


def _is_descendant(module: nn.Module, ancestor: nn.Module) -> bool:
    return any(m is module for m in ancestor.modules())
