"""Passes over trainable tensors: perturb in place, build a perturbed copy, restore + update.

Every pass walks a tensor in chunks of ``chunk_size`` elements and regenerates the directions
of that chunk from their seeds (``noise.fill_direction_``), so the extra memory of a pass is
two float32 chunk buffers whatever the size of the largest tensor.  Arithmetic is float32
(float64 for float64 tensors); stores round to nearest even, or stochastically for the update
of bf16/fp16 tensors.

A *term* is ``(seed, coeff)`` and stands for ``coeff * z(seed)``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from .noise import fill_direction_
from .rounding import HALF_DTYPES, stochastic_round_

_INTERNAL = threading.local()


@contextmanager
def internal_reads() -> Iterator[None]:
    """The core reading or writing its own tensors inside a forward -- an offloaded block's
    arrival (its pending update, its weight norm) or departure -- which is not the model's use of
    them: the out-of-place perturbation's watch for tensors used outside their module ignores it."""
    prev = getattr(_INTERNAL, "on", False)
    _INTERNAL.on = True
    try:
        yield
    finally:
        _INTERNAL.on = prev


def in_internal_reads() -> bool:
    return getattr(_INTERNAL, "on", False)


__all__ = [
    "ParamSpec",
    "HALF_DTYPES",
    "perturb_",
    "perturbed_copy",
    "perturbed_pair",
    "update_",
    "store_chunk_",
    "merge_terms",
]

Term = tuple[int, float]


@dataclass
class ParamSpec:
    """A trainable tensor as the ZO passes see it."""

    param: torch.Tensor
    name: str
    key: int
    frozen_rows: tuple[int, ...] = field(default=())
    """Rows (along dim 0) that are never perturbed or updated, e.g. an embedding's padding row."""
    in_place: bool = True
    """Perturbed in place (True) or handed to its module as a perturbed copy (False)."""
    mask: Callable[[int, int], torch.Tensor] | None = None
    """Sparsity: ``mask(start, n)`` gives the elements ``[start, start+n)`` that are perturbed
    and updated (bool); the others are left bit-identical.  Set per step by the optimizer."""
    watch_grad: bool = False
    """The tensor required grad when the optimizer was built: a step where its
    ``requires_grad`` is off leaves it out (no gradient, no update), as backprop would."""
    # -- sharded parameters (FSDP2, ``core.sharding``): ``param`` is this rank's local shard
    offset: int = 0
    """Element offset of ``param``'s first element in the whole tensor: directions are drawn
    at ``offset + i``, so a shard gets exactly its slice of the unsharded direction."""
    full_numel: int | None = None
    """Elements of the whole tensor ``param`` is a shard of (None: ``param`` is whole)."""
    source: torch.Tensor | None = None
    """The parameter object ``param`` is the local shard of (a ``DTensor``): the optimizer's
    state is keyed by it."""
    carrier: Any = None
    """A tensor held inside a quantized layer (``zo_plugins.quant.QuantizedScale``): out of
    place, the modules in ``carrier.modules`` get the perturbed copy through
    ``carrier.swap(copy)`` (which returns what it replaced) instead of a swap of
    ``_parameters``."""
    scale: Callable[[int, int], torch.Tensor] | None = None
    """A per-element factor of every direction the passes generate for this tensor,
    ``scale(start, n)`` for elements ``[start, start+n)`` (HiZOO's preconditioner H^-1/2 while
    it probes); None: unscaled.  Set per step by the optimizer (its update rule)."""

    @property
    def row_len(self) -> int:
        return self.param.numel() // max(self.param.shape[0], 1) if self.param.dim() else 1

    @property
    def global_numel(self) -> int:
        """Elements of the whole tensor (``param``'s own count unless it is a shard)."""
        return self.param.numel() if self.full_numel is None else self.full_numel


def merge_terms(*term_lists: Sequence[Term], restore_scale: float = 1.0) -> list[Term]:
    """Sum the coefficients of each seed over ``term_lists`` (the first list scaled by
    ``restore_scale``), in first-mention order, dropping zero sums: one direction generation
    per seed and pass, however many terms name it.  The one place terms are merged (the
    PyTorch and Triton passes and the in-place shifts all call it)."""
    merged: dict[int, float] = {}
    for i, terms in enumerate(term_lists):
        scale = restore_scale if i == 0 else 1.0
        for seed, coeff in terms:
            merged[seed] = merged.get(seed, 0.0) + scale * coeff
    return [(s, c) for s, c in merged.items() if c != 0.0]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _frozen_slices(spec: ParamSpec, start: int, n: int) -> list[slice]:
    out = []
    if not spec.frozen_rows:
        return out
    row = spec.row_len
    for r in spec.frozen_rows:
        lo, hi = max(r * row, start), min((r + 1) * row, start + n)
        if lo < hi:
            out.append(slice(lo - start, hi - start))
    return out


class _Chunks:
    """Chunk iterator with reusable direction buffers (one per dtype/device)."""

    def __init__(self, chunk_size: int, distribution: str) -> None:
        self.chunk_size = chunk_size
        self.distribution = distribution
        self._bufs: dict[tuple[torch.device, torch.dtype, int], torch.Tensor] = {}

    def buffer(self, device: torch.device, dtype: torch.dtype, slot: int) -> torch.Tensor:
        k = (device, dtype, slot)
        buf = self._bufs.get(k)
        if buf is None:
            buf = self._bufs[k] = torch.empty(self.chunk_size, device=device, dtype=dtype)
        return buf

    def ranges(self, numel: int):
        for start in range(0, numel, self.chunk_size):
            yield start, min(self.chunk_size, numel - start)

    def direction(
        self, spec: ParamSpec, seed: int, start: int, n: int, *, scaled: bool = True
    ) -> torch.Tensor:
        """``z(seed)`` for elements ``[start, start+n)`` in float32, zero on frozen rows and
        outside the sparsity mask, times ``spec.scale`` when set and ``scaled``; a view into a
        reused buffer."""
        z = self.buffer(spec.param.device, torch.float32, 1)[:n]
        fill_direction_(
            z,
            distribution=self.distribution,
            seed=seed,
            key=spec.key,
            offset=spec.offset + start,
            numel=spec.global_numel,
        )
        for s in _frozen_slices(spec, start, n):
            z[s] = 0
        if spec.mask is not None:
            z.masked_fill_(~spec.mask(start, n), 0)
        if scaled and spec.scale is not None:
            z.mul_(spec.scale(start, n))
        return z

    def direction_sum(
        self, spec: ParamSpec, terms: Sequence[Term], start: int, n: int, dtype: torch.dtype
    ) -> tuple[torch.Tensor, float]:
        """``(d, scale)`` with ``scale * d = sum(coeff * z(seed))`` over ``terms`` for the
        elements ``[start, start+n)``, zero on frozen rows; ``d`` is a view into a reused
        buffer.  A single float32 term is returned unscaled, so callers fold the scale into
        their ``add_(d, alpha=scale)`` instead of paying a pass for it."""
        dev = spec.param.device
        numel, at = spec.global_numel, spec.offset + start  # a shard draws its slice of the whole
        acc = self.buffer(dev, dtype, 0)[:n]
        if dtype == torch.float32 and len(terms) == 1:
            fill_direction_(
                acc, distribution=self.distribution, seed=terms[0][0], key=spec.key, offset=at, numel=numel
            )
            scale = terms[0][1]
        else:
            scale = 1.0
            tmp = self.buffer(dev, torch.float32, 1)[:n]
            acc.zero_()
            for seed, coeff in terms:
                fill_direction_(
                    tmp, distribution=self.distribution, seed=seed, key=spec.key, offset=at, numel=numel
                )
                acc.add_(tmp, alpha=coeff)
        for s in _frozen_slices(spec, start, n):
            acc[s] = 0
        if spec.mask is not None:
            acc.masked_fill_(~spec.mask(start, n), 0)
        if spec.scale is not None:
            acc.mul_(spec.scale(start, n))
        return acc, scale


def _flat(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("ZO passes need contiguous parameters; call .data = .data.contiguous() on it first.")
    return t.view(-1)


def perturb_(
    specs: Sequence[ParamSpec], terms: Sequence[Term], *, distribution: str, chunk_size: int
) -> None:
    """In place: ``theta += sum(coeff * z(seed))`` for every tensor of ``specs`` (fp32/fp64)."""
    chunks = _Chunks(chunk_size, distribution)
    with torch.no_grad():
        for spec in specs:
            flat = _flat(spec.param)
            cdt = _compute_dtype(flat)
            for start, n in chunks.ranges(flat.numel()):
                d, scale = chunks.direction_sum(spec, terms, start, n, cdt)
                flat[start : start + n].add_(d, alpha=scale)


def perturbed_copy(
    spec: ParamSpec,
    terms: Sequence[Term],
    *,
    distribution: str,
    chunk_size: int,
    chunks: _Chunks | None = None,
) -> torch.Tensor:
    """Out of place: a new tensor ``theta + sum(coeff * z(seed))`` in theta's dtype (rounded
    to nearest even).  ``theta`` itself is not touched."""
    chunks = chunks or _Chunks(chunk_size, distribution)
    with torch.no_grad():
        src = spec.param.detach()
        out = torch.empty_like(src, memory_format=torch.contiguous_format)
        flat_in, flat_out = src.reshape(-1), out.view(-1)
        cdt = _compute_dtype(src)
        for start, n in chunks.ranges(flat_in.numel()):
            d, scale = chunks.direction_sum(spec, terms, start, n, cdt)
            if src.dtype == cdt:
                torch.add(flat_in[start : start + n], d, alpha=scale, out=flat_out[start : start + n])
            else:
                flat_out[start : start + n].copy_(d.mul_(scale).add_(flat_in[start : start + n]))
        return out


def perturbed_pair(
    spec: ParamSpec,
    terms_a: Sequence[Term],
    terms_b: Sequence[Term],
    *,
    distribution: str,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perturbed_copy(spec, terms_a), perturbed_copy(spec, terms_b))`` bit for bit, in one
    pass over theta.  When both are one term of the same direction (SPSA's +eps z, -eps z),
    the direction is generated once for the pair."""
    chunks = _Chunks(chunk_size, distribution)
    shared = len(terms_a) == 1 and len(terms_b) == 1 and terms_a[0][0] == terms_b[0][0]
    with torch.no_grad():
        src = spec.param.detach()
        outs = (
            torch.empty_like(src, memory_format=torch.contiguous_format),
            torch.empty_like(src, memory_format=torch.contiguous_format),
        )
        flat_in = src.reshape(-1)
        flat_out = (outs[0].view(-1), outs[1].view(-1))
        cdt = _compute_dtype(src)
        for start, n in chunks.ranges(flat_in.numel()):
            x = flat_in[start : start + n]
            if shared and cdt == torch.float32:
                z = chunks.direction(spec, terms_a[0][0], start, n)  # zero on frozen rows, masked
                for h, coeff in enumerate((terms_a[0][1], terms_b[0][1])):
                    dst = flat_out[h][start : start + n]
                    if src.dtype == cdt:
                        torch.add(x, z, alpha=coeff, out=dst)
                    else:
                        dst.copy_(torch.mul(z, coeff).add_(x))
                continue
            for h, terms in enumerate((terms_a, terms_b)):
                d, scale = chunks.direction_sum(spec, terms, start, n, cdt)
                dst = flat_out[h][start : start + n]
                if src.dtype == cdt:
                    torch.add(x, d, alpha=scale, out=dst)
                else:
                    dst.copy_(d.mul_(scale).add_(x))
        return outs


def update_(
    spec: ParamSpec,
    *,
    restore: Sequence[Term],
    update: Sequence[Term],
    decay: float,
    distribution: str,
    chunk_size: int,
    round_seed: int | None = None,
) -> None:
    """One read-modify-write pass: ``x = theta + sum(restore)``; then
    ``theta = (1 - decay) * x + sum(update)``, frozen rows untouched.

    ``restore`` undoes an in-place perturbation (empty for out-of-place runs); ``update``
    holds ``(seed, -lr * g)`` per direction and ``decay = lr * weight_decay``.  For bf16/fp16
    tensors and ``round_seed`` given, the store rounds stochastically.
    """
    chunks = _Chunks(chunk_size, distribution)
    flat = _flat(spec.param)
    cdt = _compute_dtype(flat)
    half = flat.dtype in HALF_DTYPES
    # (1-d)(theta + sum(restore)) + sum(update) = (1-d) theta + sum(merged): one generation
    # of each direction per pass, however many terms mention it.
    terms = merge_terms(restore, update, restore_scale=1.0 - decay)
    with torch.no_grad():
        for start, n in chunks.ranges(flat.numel()):
            cur = flat[start : start + n]
            frozen = _frozen_slices(spec, start, n)
            keep = None if spec.mask is None else ~spec.mask(start, n)  # before cur changes
            direct = not half and cur.dtype == cdt and not frozen and keep is None
            x = cur if direct else cur.to(cdt, copy=True)
            if decay:
                x.mul_(1.0 - decay)
            if terms:
                d, scale = chunks.direction_sum(spec, terms, start, n, cdt)
                x.add_(d, alpha=scale)
            if not direct:
                store_chunk_(spec, cur, x, start=start, keep=keep, round_seed=round_seed)


def store_chunk_(
    spec: ParamSpec,
    cur: torch.Tensor,
    x: torch.Tensor,
    *,
    start: int,
    keep: torch.Tensor | None,
    round_seed: int | None,
) -> None:
    """Write the updated chunk ``x`` (compute dtype) into ``cur``, the chunk of ``spec`` at
    ``start``: frozen rows and elements where ``keep`` is True keep their bits; bf16/fp16
    round stochastically when ``round_seed`` is given, to nearest even otherwise."""
    n = cur.numel()
    for s in _frozen_slices(spec, start, n):
        x[s] = cur[s].to(x.dtype)
    if keep is not None:
        x = torch.where(keep, cur.to(x.dtype), x)
    if cur.dtype in HALF_DTYPES and round_seed is not None:
        stochastic_round_(cur, x, seed=round_seed, key=spec.key, offset=spec.offset + start)
    else:
        cur.copy_(x)
