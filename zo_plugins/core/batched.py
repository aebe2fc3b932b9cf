"""Batched copies: one forward pass evaluates several perturbed copies of the model.

FZOO probes ``N + 1`` points per step (``theta`` and ``theta + eps z_i``).  Rather than ``N + 1``
forwards, the closure can run ONE forward on its batch repeated ``copies`` times along dim 0
(copy ``k`` in rows ``k*B .. (k+1)*B``) and return the ``copies`` losses.  While
``BatchedCopies`` is open, every module that owns trainable tensors of the step computes copy
``k`` with ``theta + sum(term_lists[k])``:

* ``nn.Linear``: one batched matmul, ``bmm(x.view(copies, -1, in), W_k^T)`` with the copies'
  weights stacked (a transient ``copies`` x the layer's trainable tensors);
* any other module: its own forward copy by copy, on its rows of every tensor argument whose
  first dimension is the batch, with the copy's tensors swapped in.

Frozen modules run once on the whole ``copies * B`` batch: that, and the larger matmuls, is
what the batch dimension buys over ``copies`` separate forwards (measured in
docs/benchmarks.md).  The weights are never written (the copies are generated out of place from
the same keyed stream as every other pass), so nothing needs restoring.

Requirements, checked where they can be: the rows of one copy never mix with another's
(true of transformers; not of batch norm), the trainable tensors are used through the modules
that own them, and the model's own forward is not replaced by the caller meanwhile.  Dropout
draws different masks for different copies (use ``dropout='eval'`` or a model without it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ..config import ZOConfig
from .passes import ParamSpec
from .plan import StepPlan

__all__ = ["BatchedCopies"]

Term = tuple[int, float]


class BatchedCopies:
    """See the module docstring.  ``term_lists[k]`` is copy ``k``'s perturbation (``[]``: the
    unperturbed weights)."""

    def __init__(
        self,
        model: nn.Module | None,
        plan: StepPlan,
        term_lists: Sequence[Sequence[Term]],
        config: ZOConfig,
    ) -> None:
        if model is None:
            raise ValueError("batched_copies needs the model: pass the nn.Module to ZOOptimizer.")
        self.n = len(term_lists)
        self.plan, self.term_lists, self.config = plan, [list(t) for t in term_lists], config
        by_id = {id(s.param): s for s in plan.active}
        self.owners: dict[nn.Module, list[tuple[str, ParamSpec]]] = {}
        for mod in model.modules():
            for attr, p in mod._parameters.items():
                if p is not None and id(p) in by_id:
                    self.owners.setdefault(mod, []).append((attr, by_id[id(p)]))
        self.specs = list(plan.active)
        self.visited: set[int] = set()
        self._saved: list[tuple[nn.Module, Any]] = []

    # ------------------------------------------------------------------ the copies
    def _copies(self, spec: ParamSpec) -> list[torch.Tensor]:
        """The tensor of ``spec`` in each copy (the parameter itself where unperturbed)."""
        self.visited.add(id(spec.param))
        out = []
        for terms in self.term_lists:
            if not terms:
                out.append(spec.param.detach())
            else:
                out.append(
                    self.plan.passes.copy(
                        spec, terms, distribution=self.plan.stream, chunk_size=self.config.chunk_size
                    )
                )
        return out

    def _rows(self, args: tuple, kwargs: dict, mod: nn.Module) -> int:
        for v in list(args) + list(kwargs.values()):
            if isinstance(v, torch.Tensor) and v.dim():
                rows = v.shape[0]
                if rows % self.n:
                    raise ValueError(
                        f"batched_copies: {type(mod).__name__} got a batch of {rows} rows, not a multiple of "
                        f"the {self.n} copies: the closure must repeat its batch copies times along dim 0."
                    )
                return rows
        raise ValueError(
            f"batched_copies: {type(mod).__name__} was called without a batched tensor argument."
        )

    # ------------------------------------------------------------------ module forwards
    def _linear(self, mod: nn.Linear, entries: list[tuple[str, ParamSpec]]) -> Callable[..., torch.Tensor]:
        mine = dict(entries)

        def forward(x: torch.Tensor) -> torch.Tensor:
            self._rows((x,), {}, mod)
            xv = x.reshape(self.n, -1, x.shape[-1])  # copy k: its rows, every position
            if "weight" in mine:
                w = torch.stack(self._copies(mine["weight"]))  # [copies, out, in]
                y = torch.bmm(xv, w.transpose(1, 2))
            else:
                y = nn.functional.linear(xv, mod.weight)
            if mod.bias is not None:
                y = y + (torch.stack(self._copies(mine["bias"]))[:, None, :] if "bias" in mine else mod.bias)
            return y.reshape(*x.shape[:-1], y.shape[-1])

        return forward

    def _per_copy(
        self, mod: nn.Module, inner: Callable[..., Any], entries: list[tuple[str, ParamSpec]]
    ) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            rows = self._rows(args, kwargs, mod)
            b = rows // self.n
            copies = {attr: self._copies(spec) for attr, spec in entries}

            def rows_of(v: Any, k: int) -> Any:
                if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows:
                    return v[k * b : (k + 1) * b]
                return v

            outs = []
            for k in range(self.n):
                saved = [(attr, mod._parameters[attr]) for attr, _ in entries]
                for attr, _ in entries:
                    mod._parameters[attr] = copies[attr][k]
                try:
                    outs.append(
                        inner(
                            *(rows_of(a, k) for a in args),
                            **{key: rows_of(v, k) for key, v in kwargs.items()},
                        )
                    )
                finally:
                    for attr, p in saved:
                        mod._parameters[attr] = p
            return _concat(outs, type(mod).__name__)

        return forward

    def __enter__(self) -> BatchedCopies:
        for mod, entries in self.owners.items():
            had = "forward" in mod.__dict__
            self._saved.append((mod, mod.__dict__["forward"] if had else None))
            fast = isinstance(mod, nn.Linear) and not had and type(mod).forward is nn.Linear.forward
            mod.forward = self._linear(mod, entries) if fast else self._per_copy(mod, mod.forward, entries)
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        for mod, prev in reversed(self._saved):
            if prev is None:
                del mod.__dict__["forward"]
            else:
                mod.__dict__["forward"] = prev
        self._saved.clear()
        if exc_type is None:
            missing = [s.name for s in self.specs if id(s.param) not in self.visited]
            if missing:
                raise RuntimeError(
                    f"batched_copies: the forward never called the module owning {missing[:3]}"
                    f"{' and more' if len(missing) > 3 else ''}; batched copies reach trainable tensors "
                    "through their modules only. Freeze them, or use batched_copies=False."
                )


def _concat(outs: list[Any], name: str) -> Any:
    first = outs[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(outs, dim=0)
    if first is None:
        return None
    if isinstance(first, (tuple, list)):
        return type(first)(_concat([o[i] for o in outs], name) for i in range(len(first)))
    if isinstance(first, (int, float, bool, str)):
        return first
    raise TypeError(
        f"batched_copies: {name} returned a {type(first).__name__}, which the copies cannot be joined "
        "along the batch from; use batched_copies=False for this model."
    )
