"""bitsandbytes layers: ``Linear4bit`` (NF4 / FP4) and ``Linear8bitLt``.

* 4-bit: the packed uint8 weight holds two codes per byte; ``weight.quant_state.absmax`` holds
  one float32 scale per block of ``blocksize`` (64) weights, read by the dequantisation kernel
  at every forward.  With double quantization (``bnb_4bit_use_double_quant``) ``absmax`` is
  itself uint8 codes: then the continuous tensors are ``quant_state.state2.absmax`` (one scale
  per 256 block scales) and ``quant_state.offset``.
* 8-bit: ``weight`` holds int8 codes, ``SCB`` one float32 absmax per row; after the first
  forward it lives in ``module.state.SCB`` (``init_8bit_state``), where training keeps it.

On x86 CPUs with AVX512-BF16, ``Linear4bit`` repacks its weight for inference on the first
forward in eval mode without grad (``_convert_weight_packed_for_cpu``): it rewrites the codes'
layout and replaces ``absmax`` by a bf16 copy.  Training a layer's scales switches that off
for the layer (``support_avx512bf16_for_cpu = False``), so the trained tensors stay the ones
the kernels read; a layer repacked before training trains its (bf16) repacked scales.
"""

from __future__ import annotations

from torch import nn

from . import QuantizedScale, register_finder


def _name(mod_name: str, key: str) -> str:
    return f"{mod_name}.{key}" if mod_name else key


def _find_4bit(mod_name: str, mod: nn.Module) -> list[QuantizedScale] | None:
    w = mod._parameters.get("weight")
    qs = getattr(w, "quant_state", None)
    if qs is None:
        return None

    def prepare(mod=mod) -> None:
        if hasattr(mod, "support_avx512bf16_for_cpu"):
            mod.support_avx512bf16_for_cpu = False

    backend = f"bitsandbytes-{qs.quant_type or '4bit'}"
    if getattr(qs, "nested", False):
        return [
            QuantizedScale(
                name=_name(mod_name, "weight.nested_absmax"),
                tensor=qs.state2.absmax,
                modules=(mod,),
                locate=lambda mod=mod: mod.weight.quant_state.state2,
                attr="absmax",
                backend=backend,
                codes=(w, qs.absmax),
                prepare_fn=prepare,
            ),
            QuantizedScale(
                name=_name(mod_name, "weight.nested_offset"),
                tensor=qs.offset,
                modules=(mod,),
                locate=lambda mod=mod: mod.weight.quant_state,
                attr="offset",
                backend=backend,
                codes=(w, qs.absmax),
                prepare_fn=prepare,
            ),
        ]
    return [
        QuantizedScale(
            name=_name(mod_name, "weight.absmax"),
            tensor=qs.absmax,
            modules=(mod,),
            locate=lambda mod=mod: mod.weight.quant_state,
            attr="absmax",
            backend=backend,
            codes=(w,),
            prepare_fn=prepare,
        )
    ]


def _find_8bit(mod_name: str, mod: nn.Module) -> list[QuantizedScale] | None:
    state = getattr(mod, "state", None)
    w = mod._parameters.get("weight")
    scb = getattr(w, "SCB", None)
    if scb is None:
        scb = getattr(state, "SCB", None)
    if scb is None or getattr(state, "has_fp16_weights", True):
        return None

    def prepare(mod=mod) -> None:
        if getattr(mod.weight, "CB", None) is not None:
            mod.init_8bit_state()  # what the first forward does: SCB moves to module.state

    return [
        QuantizedScale(
            name=_name(mod_name, "SCB"),
            tensor=scb,
            modules=(mod,),
            locate=lambda mod=mod: mod.state,
            attr="SCB",
            backend="bitsandbytes-int8",
            codes=(w,),
            prepare_fn=prepare,
        )
    ]


def find(mod_name: str, mod: nn.Module) -> list[QuantizedScale] | None:
    import bitsandbytes as bnb

    if isinstance(mod, (bnb.nn.Linear4bit, bnb.nn.Embedding4bit)):
        return _find_4bit(mod_name, mod)
    if isinstance(mod, bnb.nn.Linear8bitLt):
        return _find_8bit(mod_name, mod)
    return None


register_finder("bitsandbytes", "bitsandbytes", find)
