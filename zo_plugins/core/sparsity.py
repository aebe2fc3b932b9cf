"""Sparse MeZO masks, computed on the fly from the weights or a keyed stream: no mask the
size of the model is ever stored.

* ``magnitude`` (Sparse MeZO, Liu et al. 2024): perturb and update the elements of each
  tensor with ``|theta| <= h``.  With ``sparsity_threshold='initial'`` (the paper's
  definition) ``h`` is the exact ``1 - sparsity`` quantile of ``|theta|`` over the whole tensor
  at the run's first step -- the pretrained weights -- and stays fixed; the mask is evaluated
  on the current weights in every pass, so the perturbed fraction follows the weights as they
  move.  With ``'per-step'`` ``h`` is re-estimated every step from the unperturbed weights:
  over the whole tensor when it has at most 65,536 elements, else over a 65,536-element
  sample drawn from the step seed (the fraction is then matched to within ~0.5%).
* ``random``: element ``i`` is perturbed when a keyed uniform ``u(seed, step // every, key,
  i) >= sparsity``; the mask changes every ``sparsity_resample_every`` steps.

Unlike ZO-Bench's code, which zeroes a fraction of z chosen by the z values themselves, the
mask here selects weights, and the same mask gates the perturbation and the update.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from .noise import mix64, native_blocks_, step_seed
from .passes import ParamSpec

__all__ = ["sparsity_mask", "MagnitudeMask", "SAMPLE"]

SAMPLE = 1 << 16
_SALT = 0x5FA75E


def _uniform(buf: torch.Tensor, gen: torch.Generator) -> None:
    buf.uniform_(generator=gen)


def magnitude_threshold(spec: ParamSpec, sparsity: float, seed: int) -> float:
    flat = spec.param.detach().reshape(-1)
    if flat.numel() <= SAMPLE:
        sample = flat.abs().float()
    else:
        gen = torch.Generator(device=flat.device).manual_seed(mix64(seed, spec.key, _SALT) >> 1)
        idx = torch.randint(0, flat.numel(), (SAMPLE,), generator=gen, device=flat.device)
        sample = flat[idx].abs().float()
    k = max(1, min(sample.numel(), round((1.0 - sparsity) * sample.numel())))
    return float(sample.kthvalue(k).values)


class MagnitudeMask:
    """``|theta| <= threshold`` on the weights as they are when a pass reads them.  The Triton
    kernels evaluate the same mask in registers (``kernel_threshold``: they test ``<``)."""

    def __init__(self, param: torch.Tensor, threshold: float) -> None:
        self.flat = param.detach().view(-1)
        self.threshold = threshold

    def __call__(self, start: int, n: int) -> torch.Tensor:
        return self.flat[start : start + n].abs() <= self.threshold

    @property
    def kernel_threshold(self) -> float:
        """The float32 ``t`` with ``|x| < t`` iff ``|x| <= threshold`` for every float32 ``x``
        (the threshold is one of the tensor's own magnitudes, so it is a float32 value)."""
        t = torch.tensor(self.threshold, dtype=torch.float32)
        return float(torch.nextafter(t, torch.tensor(float("inf"))))


def initial_threshold(spec: ParamSpec, sparsity: float) -> float:
    """The exact ``1 - sparsity`` quantile of ``|theta|`` over the whole tensor (one of its
    own magnitudes, so ``|theta| <= h`` selects ``round((1 - sparsity) * numel)`` elements
    when the magnitudes are distinct)."""
    flat = spec.param.detach().reshape(-1).abs().float()
    k = max(1, min(flat.numel(), round((1.0 - sparsity) * flat.numel())))
    return float(flat.kthvalue(k).values)


def sparsity_mask(
    spec: ParamSpec, config, step: int, thresholds: dict[str, float] | None = None
) -> Callable[[int, int], torch.Tensor]:
    """``mask(start, n)`` for step ``step``: True where the element is perturbed/updated.
    ``thresholds`` caches the run's magnitude thresholds (``sparsity_threshold='initial'``)."""
    s = config.sparsity
    if config.sparsity_mode == "magnitude":
        if config.sparsity_threshold == "initial":
            if thresholds is None:
                raise ValueError("sparsity_threshold='initial' needs the run's threshold cache.")
            if spec.name not in thresholds:
                thresholds[spec.name] = initial_threshold(spec, s)
                if thresholds[spec.name] == 0.0:
                    # e.g. LoRA's B (initialised to 0): |θ| <= 0 selects every zero element, and
                    # once the first update has moved them none is ever selected again
                    warnings.warn(
                        f"sparsity_threshold='initial': {spec.name!r} has at least {1 - s:.0%} zero "
                        "elements at the first step (LoRA's B, a zero-initialised bias), so its "
                        "threshold is 0 and it stops training after its first update; use "
                        "sparsity_threshold='per-step' or leave it out of the trainable set.",
                        stacklevel=2,
                    )
            return MagnitudeMask(spec.param, thresholds[spec.name])
        return MagnitudeMask(spec.param, magnitude_threshold(spec, s, step_seed(config.seed, step)))
    epoch_seed = mix64(config.seed, step // config.sparsity_resample_every, _SALT)
    key = mix64(epoch_seed, spec.key)
    numel, base = spec.global_numel, spec.offset  # a shard (FSDP2) draws its slice of the mask

    def mask(start: int, n: int) -> torch.Tensor:
        u = torch.empty(n, device=spec.param.device)
        native_blocks_(u, seed=key, offset=base + start, numel=numel, draw=_uniform)
        return u >= s

    return mask
