"""Inference memory of a ZO step for the models of ``recipes/``: what the hardware comments in
the recipes quote.

A ZO step runs two no-grad forwards, so its peak is that of inference:

    weights     = parameters x bytes per element of the weight dtype
    activations = the largest live set of one no-grad forward at batch B, length T:
                  residual stream + block input/output + attention output     4 * B*T*h
                  the MLP hidden (gate and up for gated MLPs)         (2 or 1) * B*T*i
                  attention scores (eager attention; 0 with SDPA/flash)       B*heads*T*T
                  all in the weight dtype, plus the logits, which transformers upcasts
                  to float32 for the loss (logits + log-softmax)              2 * B*T*V * 4 bytes
    ZO extra    = two chunk buffers of 2^20 float32 (8 MiB) for in-place perturbation of
                  float32 weights, or, for bf16/fp16 weights (perturbed out of place), a copy
                  of the largest trainable tensor (the token embedding for full-parameter runs)

The dimensions and parameter counts are those of each model's published config.json.
Run ``python scripts/recipe_memory.py`` to print the table; ``--batch``/``--length``
override the recipe values.  Add ~1 GiB for the CUDA context and allocator slack.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

GiB = 1024**3
BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Arch:
    hub_id: str
    params: float  # published parameter count
    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    gated_mlp: bool


MODELS = {
    "opt-13b": Arch("facebook/opt-13b", 12.85e9, 40, 5120, 20480, 40, 50272, False),
    "llama-2-7b": Arch("meta-llama/Llama-2-7b-hf", 6.74e9, 32, 4096, 11008, 32, 32000, True),
    "mistral-7b": Arch("mistralai/Mistral-7B-v0.1", 7.24e9, 32, 4096, 14336, 32, 32000, True),
    "qwen2.5-7b": Arch("Qwen/Qwen2.5-7B", 7.62e9, 28, 3584, 18944, 28, 152064, True),
    "phi-2": Arch("microsoft/phi-2", 2.78e9, 32, 2560, 10240, 32, 51200, False),
    "roberta-large": Arch("FacebookAI/roberta-large", 355e6, 24, 1024, 4096, 16, 50265, False),
    "smollm2-135m": Arch("HuggingFaceTB/SmolLM2-135M-Instruct", 134.5e6, 30, 576, 1536, 9, 49152, True),
}

# (model, weight dtype, batch, tokens) as used by the recipes
RECIPE_SETTINGS = {
    "opt-13b": ("float16", 16, 256),
    "llama-2-7b": ("bfloat16", 16, 256),
    "mistral-7b": ("bfloat16", 16, 256),
    "qwen2.5-7b": ("bfloat16", 16, 256),
    "phi-2": ("bfloat16", 16, 256),
    "roberta-large": ("float32", 64, 128),
    "smollm2-135m": ("float32", 16, 64),
}


def inference_memory(arch: Arch, dtype: str, batch: int, length: int, eager_attention: bool = False) -> dict:
    b = BYTES[dtype]
    weights = arch.params * b
    tokens = batch * length
    mlp = (2 if arch.gated_mlp else 1) * tokens * arch.intermediate
    scores = batch * arch.heads * length * length if eager_attention else 0
    acts = (4 * tokens * arch.hidden + mlp + scores) * b + 2 * tokens * arch.vocab * 4
    zo_extra = 8 * 1024**2 if dtype == "float32" else arch.vocab * arch.hidden * b
    total = weights + acts + zo_extra
    return {
        "weights": weights / GiB,
        "activations": acts / GiB,
        "zo_extra": zo_extra / GiB,
        "total": total / GiB,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--length", type=int, default=None)
    args = ap.parse_args()
    print(f"{'model':15} {'dtype':9} {'B':>3} {'T':>4} {'weights':>8} {'acts':>6} {'zo':>5} {'total GiB':>9}")
    for name, arch in MODELS.items():
        dtype, batch, length = RECIPE_SETTINGS[name]
        batch, length = args.batch or batch, args.length or length
        m = inference_memory(arch, dtype, batch, length)
        print(
            f"{name:15} {dtype:9} {batch:3d} {length:4d} {m['weights']:8.1f} {m['activations']:6.1f} "
            f"{m['zo_extra']:5.2f} {m['total']:9.1f}"
        )


if __name__ == "__main__":
    main()
