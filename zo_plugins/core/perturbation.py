"""Perturbation modes, in one place: how the model sees ``theta + sum(coeff * z)`` while a
forward runs.

* **out of place** (``spec.in_place = False``): forward hooks hand each module a freshly
  generated perturbed copy of its trainable tensors while it runs and put the originals back
  afterwards.  The weights are never written, so the restore is exact in every dtype and no
  exit from a forward -- an exception, ``KeyboardInterrupt`` -- can leave them perturbed.
  Costs a transient copy of one module's trainable tensors.
* **in place** (``spec.in_place = True``): the weights are shifted in bounded chunks; the
  next shift fuses the undo of the previous one into the same pass (``+eps``, then ``-2eps``),
  and the last undo is left *pending* so the update can fuse it too.  float32 round trips are
  within one ulp of the largest weight, not bit-exact.

``Perturber`` also saves and restores the RNG so every forward of a step sees the same
dropout masks, and switches the model to ``eval()`` for ``dropout='eval'``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from .interrupts import deferred_interrupts
from .passes import ParamSpec, in_internal_reads, merge_terms, perturbed_copy
from .plan import StepPlan

__all__ = ["Perturber", "RngState", "OutOfPlace", "direction_tensor"]

logger = logging.getLogger("zo_plugins")

Term = tuple[int, float]


class RngState:
    """CPU and CUDA RNG states saved before the first forward and restored before each
    later one, so every forward of a step sees the same dropout masks."""

    def __init__(self, specs: Sequence[ParamSpec]) -> None:
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


class Perturber:
    """The perturbation state of one optimizer: the pending in-place terms and the hooks.

    ``on_shift(terms)`` is called for every in-place pass with the pass's own terms (the
    trajectory records them so replay rounds exactly as the run did)."""

    def __init__(
        self, model: nn.Module | None, config: ZOConfig, on_shift: Callable[[list[Term]], None] | None = None
    ) -> None:
        self.model = model
        self.config = config
        self.on_shift = on_shift
        self.pending: list[Term] = []
        """Terms that undo the in-place perturbation the weights carry now (empty: none)."""
        self.eager: set[int] = set()
        """Tensors used outside their module: perturbed for the whole forward (out of place)."""
        self.watched = False
        self.dual_units: Any = None
        """``core.dual.DualUnits`` under the one-visit schedule (None: one forward per perturbation)."""
        self.dual_off = False
        """Set when the one-visit schedule turned out not to apply (the fallback is logged once)."""
        self.dual_ok = False
        """Set once a pair ran in one visit: later errors are the closure's own."""

    # ------------------------------------------------------------------ in place
    def shift(self, plan: StepPlan, terms: list[Term]) -> None:
        """Move in-place weights from their current perturbation to ``theta + sum(terms)``,
        fusing the pending undo into the same pass."""
        if self.on_shift is not None:
            self.on_shift(terms)
        todo = merge_terms(self.pending, terms)
        with deferred_interrupts():  # a pass is never cut in half: `pending` always tells the truth
            if todo:
                plan.passes.perturb(
                    [s for s in plan.active if s.in_place],
                    todo,
                    distribution=plan.stream,
                    chunk_size=plan.chunk_size,
                )
            self.pending = [(s, -c) for s, c in terms]

    def restore(self, plan: StepPlan | None) -> None:
        """Undo a pending in-place perturbation (no-op when none is pending)."""
        if self.pending and plan is not None:
            self.shift(plan, [])
        self.pending = []

    def take_pending(self) -> list[Term]:
        """The pending undo terms, handed to an update pass that fuses them."""
        out, self.pending = self.pending, []
        return out

    # ------------------------------------------------------------------ both modes
    @contextmanager
    def perturbed(self, plan: StepPlan, terms: list[Term]):
        """The model computes at ``theta + sum(terms)`` for the duration of the block."""
        if any(s.in_place for s in plan.active):
            self.shift(plan, terms)
        oop = [s for s in plan.active if not s.in_place]
        if not oop:
            yield
            return
        with self._out_of_place(oop, terms, plan.stream, copy=plan.passes.copy):
            yield

    @contextmanager
    def dual(self, plan: StepPlan, terms: list[Term]):
        """Forward-mode AD: every active tensor carries the tangent ``sum(terms)``."""
        with self._out_of_place(plan.active, terms, plan.stream, dual=True):
            yield

    @contextmanager
    def _out_of_place(self, specs, terms, stream, **kw):
        watch = not self.watched
        oop = OutOfPlace(self.model, specs, terms, self.config, stream, eager=self.eager, watch=watch, **kw)
        with oop:
            yield
        if watch:
            self.watched = True
            if oop.external:
                self.eager |= {id(s.param) for s in oop.external}
                logger.info(
                    "zo_plugins: %s %s read outside the module that owns it; perturbing it for the whole "
                    "forward from now on.",
                    ", ".join(repr(s.name) for s in oop.external),
                    "is" if len(oop.external) == 1 else "are",
                )

    @contextmanager
    def forward_mode(self):
        """``dropout='eval'``: the model in ``eval()`` for the probes, its flags restored."""
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

    def rng(self, specs: Sequence[ParamSpec]) -> RngState | None:
        return RngState(specs) if self.config.dropout == "same-masks" else None


class OutOfPlace:
    """Forward hooks that hand each module ``theta + sum(terms)`` while it runs.

    The pre-hook swaps the module's trainable entries of ``_parameters`` for freshly
    generated perturbed copies; the forward hook (``always_call``) puts the parameters back.
    Weights are never written, so restore is exact in every dtype.  Tied weights (an
    embedding shared with the LM head) are perturbed identically in each owner because the
    copy is regenerated from the same key.

    Some code reads a parameter without calling the module that owns it (TRL's fused LM head
    takes ``lm_head.weight`` and projects in chunks).  ``watch=True`` runs the forward under a
    ``TorchFunctionMode`` that substitutes the perturbed copy wherever the original tensor
    reaches a torch function, and reports those tensors in ``external``; tensors in
    ``eager`` are swapped into every owner for the whole forward instead (a copy held for the
    forward's duration, no mode needed).  ``Perturber`` watches the first perturbed forward of
    a run and makes what it finds eager from then on.
    """

    def __init__(
        self,
        model: nn.Module,
        specs: Sequence[ParamSpec],
        terms: list[Term],
        config: ZOConfig,
        stream: str,
        *,
        dual: bool = False,
        copy: Callable[..., torch.Tensor] = perturbed_copy,
        eager: set[int] | None = None,
        watch: bool = False,
    ) -> None:
        self.model, self.terms, self.config, self.dual, self.copy = model, terms, config, dual, copy
        self.stream = stream
        by_id = {id(s.param): s for s in specs}
        self.owners: dict[nn.Module, list[tuple[str, ParamSpec]]] = {}
        for mod in model.modules():
            for attr, p in mod._parameters.items():
                if p is not None and id(p) in by_id:
                    self.owners.setdefault(mod, []).append((attr, by_id[id(p)]))
        for spec in specs:  # scales inside quantized layers (zo_plugins.quant): the carrier swaps them
            if spec.carrier is not None:
                for mod in spec.carrier.modules:
                    self.owners.setdefault(mod, []).append((spec.carrier, spec))
        self.specs = list(specs)
        self.eager = {i for i in (eager or set()) if i in by_id}
        self.watch = watch
        self.external: list[ParamSpec] = []
        self._by_id = by_id
        self._late: dict[int, torch.Tensor] = {}
        self._mode: Any = None
        self._generating = False
        self.visited: set[int] = set()
        self.handles: list[Any] = []
        self.saved: dict[nn.Module, list[tuple[str, torch.Tensor]]] = {}
        self.depth: dict[nn.Module, int] = {}
        self._eager_saved: list[tuple[nn.Module, str, torch.Tensor]] = []

    def _perturbed(self, spec: ParamSpec) -> torch.Tensor:
        self._generating = True  # the substitution mode must not touch the passes' own reads
        try:
            if self.dual:  # forward-grad: theta carrying the tangent z (forward-mode AD)
                import torch.autograd.forward_ad as fwAD

                z = direction_tensor(spec, self.terms, self.config, distribution=self.stream)
                return fwAD.make_dual(spec.param.detach(), z.to(spec.param.dtype))
            out = self.copy(spec, self.terms, distribution=self.stream, chunk_size=self.config.chunk_size)
            # the copy carries the parameter's requires_grad (inert under no_grad): PyTorch 2.13's
            # CPU bf16 matmul of a strided 3-D input (HF's logits_to_keep slice into the tied LM
            # head) with a weight that does not require grad materialises the weight once per
            # batch row -- measured +432 MiB for SmolLM2's head at batch 8
            return out.requires_grad_(spec.param.requires_grad) if out.is_floating_point() else out
        finally:
            self._generating = False

    def _pre(self, mod: nn.Module, args: Any) -> None:
        d = self.depth.get(mod, 0)
        self.depth[mod] = d + 1
        if d:
            return
        saved = []
        self.saved[mod] = saved
        for attr, spec in self.owners[mod]:
            if id(spec.param) in self.eager:
                continue
            late = self._late.get(id(spec.param))  # already made for a use outside this module
            saved.append((attr, _swap(mod, attr, late if late is not None else self._perturbed(spec))))
            self.visited.add(id(spec.param))

    def _post(self, mod: nn.Module, args: Any, output: Any) -> None:
        if not self.depth.get(mod):  # an earlier pre-hook raised before ours ran: nothing to undo
            return
        self.depth[mod] -= 1
        if self.depth[mod] == 0:
            for attr, p in reversed(self.saved.pop(mod, [])):
                _swap(mod, attr, p)

    def substitute(self, t: Any) -> Any:
        """The perturbed copy for an original trainable tensor met outside its module."""
        spec = self._by_id.get(id(t)) if isinstance(t, torch.Tensor) else None
        if spec is None or spec.param is not t or self._generating or in_internal_reads():
            return t
        late = self._late.get(id(t))
        if late is None:
            late = self._late[id(t)] = self._perturbed(spec)
            self.external.append(spec)
            self.visited.add(id(t))
        return late

    def __enter__(self) -> OutOfPlace:
        for mod in self.owners:
            self.handles.append(mod.register_forward_pre_hook(self._pre))
            self.handles.append(mod.register_forward_hook(self._post, always_call=True))
        copies: dict[int, torch.Tensor] = {}
        for mod, entries in self.owners.items():
            for attr, spec in entries:
                if id(spec.param) in self.eager:
                    if id(spec.param) not in copies:
                        copies[id(spec.param)] = self._perturbed(spec)
                    self._eager_saved.append((mod, attr, _swap(mod, attr, copies[id(spec.param)])))
                    self.visited.add(id(spec.param))
        if self.watch:
            self._mode = _Substitute(self)
            self._mode.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for h in self.handles:
            h.remove()
        for mod, saved in self.saved.items():  # a forward that raised before its post-hook
            for attr, p in reversed(saved):
                _swap(mod, attr, p)
        self.saved.clear()
        for mod, attr, p in reversed(self._eager_saved):
            _swap(mod, attr, p)
        self._eager_saved.clear()
        self._late.clear()
        if exc_type is None:
            missing = [s.name for s in self.specs if id(s.param) not in self.visited]
            if missing:
                raise RuntimeError(
                    f"Out-of-place perturbation never reached {missing[:3]}"
                    f"{' and more' if len(missing) > 3 else ''}: the forward did not use these "
                    "parameters. Freeze them (requires_grad=False) so they are not trained, or use "
                    "perturbation='in-place' with float32 weights."
                )


def _swap(mod: nn.Module, attr: Any, value: torch.Tensor) -> torch.Tensor:
    """Put ``value`` where ``mod`` reads the tensor and return what was there: the entry
    ``attr`` of ``mod._parameters``, or a quantized layer's scale through its carrier."""
    if isinstance(attr, str):
        prev = mod._parameters[attr]
        mod._parameters[attr] = value
        return prev
    return attr.swap(value)


class _Substitute(torch.overrides.TorchFunctionMode):
    """Hands the perturbed copy to every torch function that receives an original trainable
    tensor outside the module that owns it (see ``OutOfPlace``)."""

    def __init__(self, oop: OutOfPlace) -> None:
        super().__init__()
        self.oop = oop

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        sub = self.oop.substitute
        args = tuple(_map(sub, a) for a in args)
        kwargs = {k: _map(sub, v) for k, v in kwargs.items()}
        return func(*args, **kwargs)


def _map(fn: Callable[[Any], Any], value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in value):
        return type(value)(fn(v) if isinstance(v, torch.Tensor) else v for v in value)
    return value


def direction_tensor(
    spec: ParamSpec, terms, config: ZOConfig, copy=perturbed_copy, *, distribution: str | None = None
) -> torch.Tensor:
    """``sum(coeff * z(seed))`` for the whole of ``spec`` as a float32 tensor (frozen rows and
    masked elements zero), drawn from ``distribution`` (a ``core.noise.STREAMS`` name; default
    ``config.distribution``)."""
    zeros = torch.zeros(spec.param.shape, dtype=torch.float32, device=spec.param.device)
    probe = ParamSpec(zeros, spec.name, spec.key, spec.frozen_rows, mask=spec.mask)
    return copy(probe, terms, distribution=distribution or config.distribution, chunk_size=config.chunk_size)
