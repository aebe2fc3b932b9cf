"""Quantized models: the continuous tensors of quantized layers as ZO-trainable tensors.

A weight-only quantized linear layer computes with ``W = dequant(codes, scales)``: integer
codes (int8, packed 4-bit) and continuous scales (one per row or per block of 64 weights).
QZO (Shang et al. 2025) fine-tunes such a model by perturbing and updating the scales only;
the codes never change.  This package finds those scales in the libraries' own tensor types
and hands them to the core as ordinary tensors with stable names:

==============================  ==================================================  =====================
back-end                        trained tensor (its name)                           codes left unchanged
==============================  ==================================================  =====================
torchao (``quantize_`` /        ``<module>.weight.scale`` (and ``.zero_point``      ``weight.qdata``
``TorchAoConfig``), any         when it is floating point): every floating-point
``TorchAOBaseTensor``           inner tensor of the weight except its data
bitsandbytes 4-bit              ``<module>.weight.absmax`` (block scales); with     ``weight`` (packed
(NF4 / FP4, ``Linear4bit``)     double quantization ``weight.nested_absmax`` and    uint8), the uint8
                                ``weight.nested_offset``                            ``absmax`` codes
bitsandbytes 8-bit              ``<module>.SCB`` (row absmax)                       ``weight`` (int8)
(``Linear8bitLt``)
==============================  ==================================================  =====================

Names are the keys under which the library's own ``state_dict`` stores the tensor (plus the
component for torchao's tensor subclasses), so they are stable across processes and resumes
and the direction of each scale is keyed by its name like any parameter's.

During a ZO forward the core hands each quantized module a perturbed copy of its scales
(``QuantizedScale.swap`` replaces the attribute the library's kernel reads, and puts the
original back after the module's forward): the trained tensors are written only by the update, so a step with lr 0
leaves them bit-identical, and the codes are never touched.

Finders for a back-end are registered with ``register_finder``; a finder runs only when its
library has been imported (a model cannot hold its layers otherwise), so this package imports
neither torchao nor bitsandbytes itself.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config import QUANTIZED_MODES

__all__ = [
    "QuantizedScale",
    "QuantizedSet",
    "QUANTIZED_MODES",
    "quantized_scales",
    "resolve_quantized",
    "has_adapters",
    "is_quantized",
    "scales_state_dict",
    "load_scales_state_dict",
    "frozen_codes",
    "describe",
    "prepare",
    "register_finder",
    "SUPPORTED",
]

logger = logging.getLogger("zo_plugins")

SUPPORTED = (
    "torchao weight-only tensors (Int8WeightOnlyConfig, any TorchAOBaseTensor with floating-point scales), "
    "bitsandbytes Linear4bit (NF4/FP4, with or without double quantization) and Linear8bitLt"
)


@dataclass(eq=False)
class QuantizedScale:
    """One continuous tensor of a quantized layer, trained in place by the ZO update.

    ``tensor`` is the library's own tensor object (the update writes it; the library's kernels
    read it).  ``modules`` are the modules whose forward reads it: the core's out-of-place
    perturbation calls ``swap(perturbed)`` in their forward pre-hook and ``swap(prev)`` after
    their forward.  ``locate()`` returns the object holding the tensor as attribute
    ``attr`` *now* (looked up through the module, so a weight replaced since discovery --
    ``model.to(...)``, a reload -- is detected instead of training a stale tensor)."""

    name: str
    tensor: torch.Tensor
    modules: tuple[nn.Module, ...]
    locate: Callable[[], Any]
    attr: str
    backend: str
    codes: tuple[torch.Tensor, ...] = ()
    """The integer tensors this scale multiplies (never written)."""
    prepare_fn: Callable[[], None] | None = field(default=None, repr=False)

    def prepare(self) -> None:
        """Put the layer in the state training needs (done once, before the first step)."""
        if self.prepare_fn is not None:
            self.prepare_fn()

    def current(self) -> torch.Tensor:
        return getattr(self.locate(), self.attr)

    def swap(self, value: torch.Tensor) -> torch.Tensor:
        """Make the layer compute with ``value`` and return what it held.  Installing a copy
        checks that the layer still holds ``tensor`` (the one the optimizer trains)."""
        holder = self.locate()
        prev = getattr(holder, self.attr)
        if value is not self.tensor and prev is not self.tensor:
            raise RuntimeError(
                f"The quantized layer behind {self.name!r} no longer holds the tensor the ZO optimizer "
                "trains (its weight or quantization state was replaced after the optimizer was built, e.g. "
                "by model.to(...), a checkpoint reload or bitsandbytes' CPU inference repacking). Build the "
                "ZO optimizer (or start training) after moving or reloading the model."
            )
        setattr(holder, self.attr, value)
        return prev


Finder = Callable[[str, nn.Module], "list[QuantizedScale] | None"]
_FINDERS: list[tuple[str, str, Finder]] = []  # (name, library module that must be imported, finder)


def register_finder(name: str, library: str, finder: Finder) -> None:
    """Register ``finder(module_name, module) -> [QuantizedScale] | None`` for a back-end whose
    layers can exist only once ``library`` is imported.  Duplicate names are refused."""
    if any(n == name for n, _, _ in _FINDERS):
        raise ValueError(f"A quantized back-end named {name!r} is already registered.")
    _FINDERS.append((name, library, finder))


def _active_finders() -> list[Finder]:
    return [f for _, lib, f in _FINDERS if lib in sys.modules]


def quantized_scales(model: nn.Module | None) -> list[QuantizedScale]:
    """Every trainable scale of every quantized layer of ``model``, in module order.  A tensor
    read by several modules (a tied weight) is listed once, with all its readers."""
    if model is None:
        return []
    finders = _active_finders()
    if not finders:
        return []
    out: dict[int, QuantizedScale] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for finder in finders:
            found = finder(mod_name, mod)
            if not found:
                continue
            for s in found:
                seen = out.get(id(s.tensor))
                if seen is None:
                    out[id(s.tensor)] = s
                elif not any(m is mod for m in seen.modules):
                    seen.modules = (*seen.modules, mod)
            break
    return list(out.values())


def is_quantized(model: nn.Module | None) -> bool:
    """Whether ``model`` holds a quantized layer of a supported back-end (or was loaded
    through a transformers ``quantization_config``)."""
    if model is None:
        return False
    if any(getattr(m, "hf_quantizer", None) is not None for m in model.modules()):
        return True
    return bool(quantized_scales(model))


def has_adapters(model: nn.Module | None) -> bool:
    """Whether ``model`` carries PEFT adapters (LoRA, prefix, prompt tuning, ...)."""
    if model is None or "peft" not in sys.modules:
        return False
    from peft import PeftModel
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, (PeftModel, BaseTunerLayer)) for m in model.modules())


def _hf_quant_method(model: nn.Module) -> str | None:
    for m in model.modules():
        q = getattr(m, "hf_quantizer", None)
        if q is not None:
            cfg = getattr(q, "quantization_config", None)
            return str(getattr(cfg, "quant_method", type(q).__name__))
    return None


def resolve_quantized(model: nn.Module | None, mode: str) -> str:
    """What ``ZOConfig.quantized=mode`` trains on ``model``: 'scales', 'adapters' or 'none'.

    'auto': the adapters when the model carries PEFT adapters, the scales when it is quantized
    and has none, otherwise 'none' (the tensors that require grad, as for any model).  Raises
    ``ValueError`` with the fix when the model cannot serve the mode."""
    if mode not in QUANTIZED_MODES:
        raise ValueError(
            f"ZOConfig.quantized={mode!r} is not valid: choose one of {', '.join(map(repr, QUANTIZED_MODES))}."
        )
    if mode == "none" or model is None:
        return "none"
    scales = quantized_scales(model)
    adapters = has_adapters(model)
    if mode == "auto":
        if adapters:
            return "adapters"
        if scales:
            return "scales"
        method = _hf_quant_method(model)
        if method is not None:
            logger.warning(
                "zo_plugins: the model was quantized with %r, whose layers hold no scales this version can "
                "train (supported: %s); training the tensors that require grad instead.",
                method,
                SUPPORTED,
            )
        return "none"
    if mode == "scales" and not scales:
        method = _hf_quant_method(model)
        what = f"its quantization ({method!r}) is not one" if method else "it has no quantized layer"
        raise ValueError(
            f"ZOConfig.quantized='scales' trains the scales of quantized layers, but {what} of the supported "
            f"back-ends ({SUPPORTED}). Load the model with a supported quantization_config (e.g. "
            "BitsAndBytesConfig(load_in_4bit=True) or TorchAoConfig(Int8WeightOnlyConfig())), or use "
            "quantized='none' to train the tensors that require grad."
        )
    if mode == "adapters" and not adapters:
        raise ValueError(
            "ZOConfig.quantized='adapters' trains PEFT adapters, but the model has none: attach them first "
            "(peft.get_peft_model(model, LoraConfig(...))), or use quantized='scales' to train the "
            "quantization scales."
        )
    return mode


class QuantizedSet:
    """What the ZO optimizer needs to know about a model's quantized layers: the resolved
    ``quantized`` mode, the scales by tensor id (names, carriers) and their preparation."""

    def __init__(self, model: nn.Module | None, mode: str) -> None:
        self.mode = resolve_quantized(model, mode)
        self.scales = quantized_scales(model)
        self._by_id = {id(s.tensor): s for s in self.scales}

    def tensors(self) -> list[torch.Tensor]:
        return [s.tensor for s in self.scales]

    def names(self) -> dict[int, str]:
        return {id(s.tensor): s.name for s in self.scales}

    def carrier(self, tensor: torch.Tensor) -> QuantizedScale | None:
        return self._by_id.get(id(tensor))

    def prepare(self) -> None:
        """Put every quantized layer in the state training needs (``QuantizedScale.prepare``):
        done for the whole model, so training and evaluation compute with the same quantized
        weights whether the scales or the adapters train."""
        for s in self.scales:
            s.prepare()


def prepare(model: nn.Module) -> None:
    """Put every quantized layer of ``model`` in the state ZO training keeps it in (what
    ``ZOOptimizer`` does when it is built): bitsandbytes' CPU inference repacking off, 8-bit
    state settled.  Call it before evaluating a model you will then train, so the evaluation
    computes with the same quantized weights as training (and does not repack them)."""
    for s in quantized_scales(model):
        s.prepare()


# ---------------------------------------------------------------------------- checkpoints
def scales_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every trainable scale of ``model`` by name: what scale-ZO fine-tuning changed
    (the codes never change), small enough to save as an adapter-sized checkpoint."""
    return {s.name: s.tensor.detach().clone() for s in quantized_scales(model)}


def load_scales_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from ``scales_state_dict``) into ``model``'s scales in place.  Every
    name must match and every shape agree; nothing is written otherwise."""
    scales = {s.name: s for s in quantized_scales(model)}
    missing = sorted(set(scales) - set(state))
    unexpected = sorted(set(state) - set(scales))
    if missing or unexpected:
        raise ValueError(
            f"load_scales_state_dict: the state does not match the model's quantized scales "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]}); load it into the same quantized "
            "architecture it was saved from."
        )
    for name, s in scales.items():
        v = state[name]
        if tuple(v.shape) != tuple(s.tensor.shape):
            raise ValueError(
                f"load_scales_state_dict: {name!r} has shape {tuple(v.shape)} in the state but "
                f"{tuple(s.tensor.shape)} in the model."
            )
    with torch.no_grad():
        for name, s in scales.items():
            s.tensor.copy_(state[name])


def frozen_codes(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the integer codes of every quantized layer (what training must never change)."""
    out = {}
    for s in quantized_scales(model):
        for i, c in enumerate(s.codes):
            out[f"{s.name}:codes{i}"] = c.detach().clone()
    return out


def describe(model: nn.Module) -> dict[str, Any]:
    """Counts, bytes and magnitude of the trainable scales, per back-end.  ``eps`` and ``lr``
    are in the units of the scales, which differ by back-end (torchao's int8 scale is a row's
    absmax / 127, bitsandbytes' absmax the block's absmax): pick ``eps`` around 1e-2 x ``rms``."""
    per: dict[str, dict[str, float]] = {}
    for s in quantized_scales(model):
        d = per.setdefault(s.backend, {"tensors": 0, "elements": 0, "bytes": 0, "sumsq": 0.0})
        d["tensors"] += 1
        d["elements"] += s.tensor.numel()
        d["bytes"] += s.tensor.numel() * s.tensor.element_size()
        d["sumsq"] += float(s.tensor.detach().double().square().sum())
    for d in per.values():
        d["rms"] = (d.pop("sumsq") / max(d["elements"], 1)) ** 0.5
    return per


def iter_inner(t: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) of a tensor subclass' inner tensors (``__tensor_flatten__``)."""
    names, _ = t.__tensor_flatten__()  # type: ignore[attr-defined]
    for n in names:
        v = getattr(t, n, None)
        if isinstance(v, torch.Tensor):
            yield n, v


def _load_builtin() -> None:
    from . import _bitsandbytes, _torchao  # noqa: F401 - register their finders


_load_builtin()
