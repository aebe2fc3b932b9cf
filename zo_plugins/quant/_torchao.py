"""torchao weight-only tensors: the floating-point inner tensors of a ``TorchAOBaseTensor``
weight (``scale``, a floating ``zero_point``) are trained; ``qdata`` is the codes.

torchao's tensor subclasses list their inner tensors in ``__tensor_flatten__`` and read them
as attributes in their kernels (``Int8Tensor``: ``qdata`` int8, ``scale`` one per row, an int8
``zero_point``), so swapping the attribute for the forward hands the kernel a perturbed scale.
"""

from __future__ import annotations

import torch
from torch import nn

from . import QuantizedScale, iter_inner, register_finder

DATA_NAMES = ("qdata",)
"""Inner tensors that hold the quantized data (never trained, whatever their dtype)."""


def _is_torchao(t: object) -> bool:
    return (
        isinstance(t, torch.Tensor)
        and type(t).__module__.startswith("torchao")
        and hasattr(t, "__tensor_flatten__")
    )


def find(mod_name: str, mod: nn.Module) -> list[QuantizedScale] | None:
    found = []
    for attr, w in mod._parameters.items():
        if not _is_torchao(w):
            continue
        inner = list(iter_inner(w))
        codes = tuple(t for n, t in inner if n in DATA_NAMES or not t.is_floating_point())
        for n, t in inner:
            if n in DATA_NAMES or not t.is_floating_point() or t.dtype.itemsize < 2:
                continue  # the data, integer zero points, float8 payloads
            prefix = f"{mod_name}.{attr}" if mod_name else attr
            found.append(
                QuantizedScale(
                    name=f"{prefix}.{n}",
                    tensor=t,
                    modules=(mod,),
                    locate=lambda mod=mod, attr=attr: mod._parameters[attr],
                    attr=n,
                    backend=f"torchao-{type(w).__name__}",
                    codes=codes,
                )
            )
    return found or None


register_finder("torchao", "torchao", find)
