"""Shared test helpers: tiny models built from configs (no downloads), snapshots, bit checks."""

from __future__ import annotations

import os
import socket
import sys

import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))

VOCAB = 64


def tiny_hf_model(
    kind: str, dtype: torch.dtype = torch.float32, dropout: float = 0.0, seed: int = 0
) -> nn.Module:
    """A tiny randomly initialised transformers model of the given family."""
    import transformers as tf

    torch.manual_seed(seed)
    if kind == "opt":
        cfg = tf.OPTConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            ffn_dim=32,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=16,
            dropout=dropout,
            attention_dropout=dropout,
            pad_token_id=1,
        )
        model = tf.OPTForCausalLM(cfg)
    elif kind == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            tie_word_embeddings=True,
            attention_dropout=dropout,
            pad_token_id=0,
        )
        model = tf.LlamaForCausalLM(cfg)
    elif kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=2,
            n_head=2,
            n_positions=64,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
        )
        model = tf.GPT2LMHeadModel(cfg)
    elif kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            num_labels=2,
            hidden_dropout_prob=dropout,
            attention_probs_dropout_prob=dropout,
            pad_token_id=0,
        )
        model = tf.BertForSequenceClassification(cfg)
    else:
        raise ValueError(kind)
    return model.to(dtype)


def tiny_batch(kind: str, batch: int = 4, length: int = 12, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if kind == "bert":
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.randint(0, 2, (batch,), generator=g),
        }
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.clone()}


def _mlp64() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 20), nn.Tanh(), nn.Linear(20, 1)).double()
    x = torch.randn(32, 10, dtype=torch.float64)
    y = torch.randn(32, 1, dtype=torch.float64)
    return model, x, y


def params_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    bad = [n for n in a if not torch.equal(_bits(a[n]), _bits(b[n]))]
    assert not bad, f"{len(bad)} tensors differ bitwise, e.g. {bad[:3]}"


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def max_ulp_diff(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in units in the last place between two float32 tensors."""
    ia = a.detach().float().reshape(-1).view(torch.int32).long()
    ib = b.detach().float().reshape(-1).view(torch.int32).long()
    # map the sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return int((ia - ib).abs().max().item()) if ia.numel() else 0


def lm_dataset(n=64, length=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def args_for(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_steps=4,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        seed=0,
        data_seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    base.update(kw)
    from transformers import TrainingArguments

    return TrainingArguments(**base)


def install_comm_counters() -> dict:
    """Instrument this process for the multi-process tests: count the Python-level
    all-reduces (the ZO scalar) with their sizes and local values, and, through a DDP comm
    hook, every gradient bucket DDP would all-reduce.  Returns the live counters."""
    import torch.distributed as dist

    counters = {"scalar_all_reduces": 0, "scalar_numel": 0, "ddp_bucket_all_reduces": 0, "local_grads": []}
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        counters["scalar_all_reduces"] += 1
        counters["scalar_numel"] += tensor.numel()
        counters["local_grads"].append(tensor.tolist())  # this rank's values before the reduction
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    ddp_init = torch.nn.parallel.DistributedDataParallel.__init__

    def init(self, *args, **kwargs):
        ddp_init(self, *args, **kwargs)

        def hook(state, bucket):
            counters["ddp_bucket_all_reduces"] += 1
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        self.register_comm_hook(None, hook)

    torch.nn.parallel.DistributedDataParallel.__init__ = init
    return counters


# ---------------------------------------------------------------------------- quantized models
QUANT_BACKENDS = ("torchao-int8", "bnb-nf4", "bnb-fp4-double", "bnb-int8")
"""Tiny quantized Llamas: torchao Int8WeightOnlyConfig and bitsandbytes NF4, FP4 with double
quantization, and int8, each loaded through transformers' ``quantization_config``."""
_TINY_DIR: dict[str, str] = {}


def quant_available(backend: str) -> bool:
    import importlib.util

    return (
        importlib.util.find_spec("torchao" if backend.startswith("torchao") else "bitsandbytes") is not None
    )


def tiny_llama_dir() -> str:
    """A tiny Llama saved once per process (what ``from_pretrained`` quantizes)."""
    if "llama" not in _TINY_DIR:
        import tempfile

        d = tempfile.mkdtemp(prefix="zo-tiny-llama-")
        tiny_hf_model("llama").save_pretrained(d)
        _TINY_DIR["llama"] = d
    return _TINY_DIR["llama"]


def quantization_config(backend: str):
    import transformers as tf

    if backend == "torchao-int8":
        from torchao.quantization import Int8WeightOnlyConfig

        return tf.TorchAoConfig(Int8WeightOnlyConfig())
    fp32 = {"bnb_4bit_compute_dtype": torch.float32}
    return {
        "bnb-nf4": lambda: tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", **fp32),
        "bnb-fp4-double": lambda: tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True, **fp32
        ),
        "bnb-int8": lambda: tf.BitsAndBytesConfig(load_in_8bit=True),
    }[backend]()


def tiny_quantized_llama(backend: str) -> nn.Module:
    """A fresh tiny Llama (the same weights every call) quantized by ``backend``, in train mode."""
    import logging
    import warnings

    import transformers as tf

    logging.getLogger("transformers").setLevel(logging.ERROR)
    kw = {} if backend.startswith("torchao") else {"device_map": "cpu"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tf.LlamaForCausalLM.from_pretrained(
            tiny_llama_dir(), quantization_config=quantization_config(backend), **kw
        )
    return model.train()


def frozen_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Everything training scales must leave bit-identical: every parameter and buffer and the
    integer codes of every quantized layer."""
    from zo_plugins.quant import frozen_codes

    out = {  # torchao weights are covered by their codes (qdata) and trained scales
        f"param:{n}": p.detach().clone()
        for n, p in model.named_parameters()
        if not type(p).__module__.startswith("torchao")
    }
    out.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    out.update(frozen_codes(model))
    return out


def tiny_word_tokenizer():
    """A word-level tokenizer over ``w0`` .. ``w59`` (+ pad, eos, unk: ids 60-62), matching the
    tiny models' 64-token vocabulary; TRL and the docs snippets need a real tokenizer object."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(60)}
    vocab.update({"<pad>": 60, "<eos>": 61, "<unk>": 62})
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_cmd_for(script, *args, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` of ``script`` with ``nproc`` processes on a free port."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        str(script),
        *map(str, args),
    ]
