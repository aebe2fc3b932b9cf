"""The one-visit schedule: both perturbed forwards of a step in one pass over the model.

ZO2 (Wang et al. 2025) runs the +eps z and -eps z forwards block by block, so each block is
fetched once per step (and, offloaded, crosses to the device once).  Here the model runs
once on a doubled batch: a **unit** -- a transformer block, or a leaf module outside the
blocks that holds parameters or draws dropout -- receives the two halves stacked along the
batch dimension and runs its own forward twice, on each half with that half's perturbed
weights (both generated in one pass over the unit's tensors: each direction once for the
pair), restoring the RNG between the halves so both see the same dropout masks.  Code
between units (residual adds, mask building, rotary tables) runs once on the stacked batch;
the loss is computed per half (``loss_function`` of the Hugging Face model).

Every half runs exactly the computation the two separate forwards would run on a batch of B,
so L+ and L- are bit-identical to the per-forward schedule (tested).  What it needs, checked
on use: the closure returns the model's own loss (``outputs.loss``, computed through
``self.loss_function``, as Hugging Face causal LMs do with ``labels``); no dropout is drawn
on the stacked batch outside a unit.  Elsewhere -- objectives on logits, TRL's fused head --
the optimizer falls back to one forward per perturbation, with a logged reason.

Costs: activations of a batch of 2B (as two sequential forwards would not); two perturbed
copies of one unit at a time.  Saves: one generation of each direction per step (two instead
of three) and, with offload, one visit of each block instead of two.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from .passes import ParamSpec, perturbed_pair
from .plan import StepPlan

__all__ = ["DualUnits", "DualRun", "NotDual"]

logger = logging.getLogger("zo_plugins")

Term = tuple[int, float]
_DROPOUTS = {
    torch.nn.functional.dropout,
    torch.nn.functional.alpha_dropout,
    torch.nn.functional.feature_alpha_dropout,
    torch.nn.functional.dropout1d,
    torch.nn.functional.dropout2d,
    torch.nn.functional.dropout3d,
}


class NotDual(RuntimeError):
    """The model or the closure does not meet the one-visit schedule's needs (the message
    says which); the optimizer falls back to one forward per perturbation."""


def _has_params(m: nn.Module) -> bool:
    return any(p is not None for p in m._parameters.values())


class DualUnits:
    """The units of ``model``: its ``blocks`` and every leaf module outside them that holds
    parameters or is a dropout module."""

    def __init__(self, model: nn.Module, blocks: Sequence[nn.Module]) -> None:
        self.model = model
        self.blocks = list(blocks)
        inside = {id(m) for b in self.blocks for m in b.modules()}
        self.units: list[nn.Module] = list(self.blocks)
        for m in model.modules():
            if id(m) in inside or next(m.children(), None) is not None:
                continue
            if _has_params(m) or isinstance(m, nn.modules.dropout._DropoutNd):
                self.units.append(m)
        self.unit_ids = {id(u) for u in self.units}
        # the owners, within each unit, of every parameter: (module, attribute)
        self.owners: dict[int, list[tuple[nn.Module, str, torch.Tensor]]] = {}
        for u in self.units:
            entries = []
            for m in u.modules():
                for attr, p in m._parameters.items():
                    if p is not None:
                        entries.append((m, attr, p))
            self.owners[id(u)] = entries
        covered = {id(p) for es in self.owners.values() for _, _, p in es}
        stray = [n for n, p in model.named_parameters() if id(p) not in covered]
        if stray:
            raise NotDual(
                f"parameters {stray[:3]} sit in a module with children outside the blocks: the "
                "one-visit schedule perturbs parameters per unit (a block or a leaf module)."
            )
        self.losses = [m for m in model.modules() if hasattr(type(m), "loss_function")]
        # the outermost Hugging Face models: the calls a closure makes, answered twice (below)
        entries: list[nn.Module] = []
        for m in model.modules():
            if hasattr(type(m), "loss_function") and not any(m in e.modules() for e in entries):
                entries.append(m)
        self.entries = entries


class DualRun:
    """One pair of perturbed forwards in one pass (see the module docstring): installed for
    the duration of one closure call."""

    def __init__(
        self,
        units: DualUnits,
        specs: Sequence[ParamSpec],
        terms_a: list[Term],
        terms_b: list[Term],
        config: ZOConfig,
        plan: StepPlan,
        *,
        same_masks: bool,
        arrival: Callable[[nn.Module], None] | None = None,
    ) -> None:
        self.units, self.config, self.plan = units, config, plan
        self.terms_a, self.terms_b = terms_a, terms_b
        self.same_masks = same_masks
        self.arrival = arrival
        self.specs = {id(s.param): s for s in specs}
        self.batch: int | None = None
        self.losses: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._saved_forward: list[tuple[nn.Module, bool, Any]] = []
        self._saved_loss: list[tuple[nn.Module, bool, Any]] = []
        self._mode: Any = None
        self.depth = 0
        self._caches: dict[int, Any] = {}  # a KV cache the model hands its blocks -> the second half's
        self._answer: tuple[list[int], Any] | None = None  # (ids of the call's tensors, 2nd half's output)
        self.entry_calls = 0

    # ------------------------------------------------------------------ the units
    def _split_run(self, unit: nn.Module, orig: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("input", None))
        if not isinstance(x, torch.Tensor):
            x = next((v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)), None)
        if x is None or x.dim() == 0:
            raise NotDual(f"{type(unit).__name__} was called without a batched tensor input.")
        if self.batch is None:
            self.batch = x.shape[0]
        B = self.batch
        n = x.shape[0]
        mode = "split" if n == 2 * B else "same" if n in (B, 1) else None
        if mode is None:
            raise NotDual(f"{type(unit).__name__} got a batch of {n} rows, neither {B} nor {2 * B}.")
        owners = [(m, attr, p) for m, attr, p in self.units.owners[id(unit)]]
        trained = [(m, attr, p) for m, attr, p in owners if id(p) in self.specs]
        if mode == "same" and not trained:  # frozen, on the shared input: once, for both halves
            out = orig(*args, **kwargs)
            return _stack(out, out, B) if n == B else out
        copies = {}
        for _, _, p in trained:
            if id(p) not in copies:
                copies[id(p)] = perturbed_pair(
                    self.specs[id(p)],
                    self.terms_a,
                    self.terms_b,
                    distribution=self.plan.stream,
                    chunk_size=self.plan.chunk_size,
                )
        args_b, kwargs_b = self._own_caches(args, kwargs)  # before the first half writes into the cache
        halves = []
        state = torch.get_rng_state() if self.same_masks else None
        cuda = {p.device for _, _, p in owners if p.is_cuda}
        cuda_state = {d: torch.cuda.get_rng_state(d) for d in cuda} if self.same_masks else {}
        for h in range(2):
            if h == 1 and state is not None:
                torch.set_rng_state(state)
                for d, s in cuda_state.items():
                    torch.cuda.set_rng_state(s, d)
            args_h, kw_h = (args_b, kwargs_b) if h == 1 else (args, kwargs)
            a, kw = (_half(args_h, h, B), _half_kw(kw_h, h, B)) if mode == "split" else (args_h, kw_h)
            saved = []
            for m, attr, p in trained:
                saved.append((m, attr, m._parameters[attr]))
                m._parameters[attr] = copies[id(p)][h]
            try:
                halves.append(orig(*a, **kw))
            finally:
                for m, attr, p in saved:
                    m._parameters[attr] = p
        if mode == "same" and n == 1:
            return _stack(halves[0], halves[1], B, expand=True)
        return _stack(halves[0], halves[1], B)

    def _own_caches(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The second half gets its own copy of any KV cache the model hands its blocks
        (positionally, as GPT-2 does, or by keyword): made from the empty cache the forward
        starts with, before the first half fills it; sharing one, the second half would attend
        over the first half's keys too."""

        def twin(v: Any) -> Any:
            if not _is_cache(v):
                return v
            if id(v) not in self._caches:
                self._caches[id(v)] = (v, _empty_like_cache(v))  # keep v alive: ids stay unique
            return self._caches[id(v)][1]

        return tuple(twin(a) for a in args), {k: twin(v) for k, v in kwargs.items()}

    def _wrap(self, unit: nn.Module) -> None:
        had = "forward" in unit.__dict__
        orig = unit.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            self.depth += 1
            try:
                return self._split_run(unit, orig, args, kwargs)
            finally:
                self.depth -= 1

        self._saved_forward.append((unit, had, unit.__dict__.get("forward")))
        unit.forward = forward  # type: ignore[method-assign]

    # ------------------------------------------------------------------ the loss
    def _wrap_loss(self, model: nn.Module) -> None:
        had = "_loss_function" in model.__dict__
        orig = model.loss_function

        def loss_function(logits=None, labels=None, *a, **kw):
            B = self.batch
            if (
                B is None
                or logits is None
                or logits.shape[0] != 2 * B
                or labels is None
                or labels.shape[0] != B
            ):
                return orig(logits, labels, *a, **kw) if logits is not None else orig(*a, **kw)
            la = orig(logits[:B], labels, *a, **kw)
            lb = orig(logits[B:], labels, *a, **kw)
            self.losses.append((la, lb))
            return la

        self._saved_loss.append((model, had, model.__dict__.get("_loss_function")))
        model.loss_function = loss_function

    # ------------------------------------------------------------------ the closure's model call
    def _wrap_entry(self, model: nn.Module) -> None:
        """Answer the closure's model call twice: the first call runs the model once on the
        doubled batch and returns the first half's outputs, keeping the second half's; the
        closure's second call, with the same inputs, gets them without computing."""
        had = "forward" in model.__dict__
        orig = model.forward

        def forward(*args: Any, **kwargs: Any) -> Any:
            ids = [id(v) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)]
            if self._answer is not None:
                if ids != self._answer[0]:
                    raise NotDual(
                        "the closure called the model with other inputs for the second perturbation"
                    )
                out, self._answer = self._answer[1], None
                return out
            self.entry_calls += 1
            if self.entry_calls > 1:
                raise NotDual("the closure called the model more than once per perturbation")
            main = kwargs.get("input_ids", kwargs.get("inputs_embeds", args[0] if args else None))
            if isinstance(main, torch.Tensor) and main.dim() and self.batch is None:
                self.batch = main.shape[0]  # the batch, before any unit doubles it
            n_losses = len(self.losses)
            out = orig(*args, **kwargs)
            B = self.batch
            if B is None:
                raise NotDual("no unit ran in the model's forward")
            losses = self.losses[n_losses:]
            out_a, out_b = _split_outputs(out, B, losses[0] if len(losses) == 1 else None)
            self._answer = (ids, out_b)
            return out_a

        self._saved_forward.append((model, had, model.__dict__.get("forward")))
        model.forward = forward  # type: ignore[method-assign]

    # ------------------------------------------------------------------ context
    def __enter__(self) -> DualRun:
        try:
            for u in self.units.units:
                self._wrap(u)
            for m in self.units.entries:
                self._wrap_entry(m)
            for m in self.units.losses:
                self._wrap_loss(m)
            self._mode = _TopLevelGuard(self)
            self._mode.__enter__()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
        for unit, had, old in reversed(self._saved_forward):
            if had:
                unit.forward = old  # type: ignore[method-assign]
            else:
                unit.__dict__.pop("forward", None)
        self._saved_forward.clear()
        for model, had, old in reversed(self._saved_loss):
            if had:
                model.__dict__["_loss_function"] = old
            else:
                model.__dict__.pop("_loss_function", None)
        self._saved_loss.clear()

    @property
    def answered(self) -> bool:
        """The closure's model call went through an entry: call the closure again for the
        second half (its outputs are ready)."""
        return self.entry_calls == 1 and self._answer is not None

    def pair(self, value: float) -> tuple[float, float]:
        """(L_a, L_b) after the closure returned ``value`` without passing an entry (it called
        the model's forward function itself): the value must be the model's own loss."""
        if len(self.losses) != 1:
            raise NotDual(
                f"the model computed {len(self.losses)} per-half losses (expected 1): the closure must call the "
                "model once with `labels`, so its loss_function gives each half's loss."
            )
        la, lb = (float(v.detach().float().item()) for v in self.losses[0])
        if la != value:
            raise NotDual(
                f"the closure returned {value!r}, not the model's own loss {la!r}: the one-visit schedule needs "
                "the closure to return outputs.loss."
            )
        return la, lb


class _TopLevelGuard(torch.overrides.TorchFunctionMode):
    """Refuses dropout drawn on the stacked batch outside a unit: its masks would differ
    between the halves (and from the per-forward schedule)."""

    def __init__(self, run: DualRun) -> None:
        super().__init__()
        self.run = run

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.run.depth == 0 and func in _DROPOUTS:
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training and p:
                raise NotDual(
                    f"the model applies dropout (p={p}) outside its blocks' and leaf modules' forwards; on the "
                    "stacked batch its masks would differ between the two perturbations"
                )
        return func(*args, **kwargs)


def _half(args: tuple, h: int, B: int) -> tuple:
    out = list(args)
    if out and isinstance(out[0], torch.Tensor) and out[0].shape[:1] == (2 * B,):
        out[0] = out[0][h * B : (h + 1) * B]
    return tuple(out)


def _half_kw(kwargs: dict, h: int, B: int) -> dict:
    if "hidden_states" in kwargs and isinstance(kwargs["hidden_states"], torch.Tensor):
        hs = kwargs["hidden_states"]
        if hs.shape[:1] == (2 * B,):
            return dict(kwargs, hidden_states=hs[h * B : (h + 1) * B])
    return kwargs


def _stack(a: Any, b: Any, B: int, expand: bool = False) -> Any:
    if isinstance(a, torch.Tensor):
        if expand and a.dim() and a.shape[0] == 1:
            return torch.cat([a.expand(B, *a.shape[1:]), b.expand(B, *b.shape[1:])])
        if a.dim() and a.shape[0] == B:
            return torch.cat([a, b])
        return a
    if isinstance(a, tuple) and hasattr(a, "_fields"):  # namedtuple
        return type(a)(*(_stack(x, y, B, expand) for x, y in zip(a, b)))
    if isinstance(a, (tuple, list)):
        return type(a)(_stack(x, y, B, expand) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(a)({k: _stack(a[k], b[k], B, expand) for k in a})
    return a


def _is_cache(v: Any) -> bool:
    return hasattr(v, "update") and hasattr(v, "get_seq_length") and type(v).__name__.endswith("Cache")


def _empty_like_cache(cache: Any) -> Any:
    """A new empty cache of the same kind (the model's cache is empty when the forward starts;
    a deep copy then is empty too, with the same configuration)."""
    import copy

    return copy.deepcopy(cache)


def _split_outputs(out: Any, B: int, loss: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[Any, Any]:
    """The two halves of a model output computed on the doubled batch: tensors whose first
    dimension is 2B are split; the loss is the per-half one the loss function computed."""

    def split(v: Any, key: str | None = None) -> tuple[Any, Any]:
        if isinstance(v, torch.Tensor):
            if key == "loss" or (v.dim() == 0 and key is None):
                if loss is None:
                    raise NotDual(
                        "the model returned a loss that was not computed per half by its loss_function"
                    )
                return loss
            if v.dim() and v.shape[0] == 2 * B:
                return v[:B], v[B:]
            if v.dim() == 0:
                raise NotDual(
                    f"the model returned the scalar {key!r}, which cannot be split between the halves"
                )
            return v, v
        if isinstance(v, (tuple, list)) and not hasattr(v, "keys"):
            pairs = [split(x) for x in v]
            return type(v)(p[0] for p in pairs), type(v)(p[1] for p in pairs)
        return v, v

    if hasattr(out, "keys") and hasattr(out, "__getitem__"):  # ModelOutput / dict
        a, b = {}, {}
        for k in list(out.keys()):
            a[k], b[k] = split(out[k], k)
        make = type(out)
        try:
            return make(**a), make(**b)
        except TypeError:
            return dict(a), dict(b)
    return split(out)
