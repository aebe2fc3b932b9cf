"""One rank of a multi-process ZO run (launched by test_multiprocess.py through torchrun or
accelerate launch).  Writes this rank's final parameters and counters to OUT_DIR."""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from zo_testing import install_comm_counters, tiny_hf_model  # noqa: E402

MODE, OUT_DIR = sys.argv[1], sys.argv[2]
ZO = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
STEPS = 4
METHODS = {  # mode "methods": every estimator's collective, one launch
    "spsa-3": {"n_queries": 3},
    "forward-2": {"estimator": "forward", "n_queries": 2},
    "forward-grad": {"estimator": "forward-grad"},
    "cge": {"estimator": "cge", "cge_coordinates": 5},
    "rank-3": {"estimator": "rank", "n_queries": 3},
    "adam": {"optimizer": "zo-adam"},
    "conservative": {"optimizer": "zo-sgd-conservative", "lr": 0.1},  # large: some steps get worse
    "spsa-1": {},  # the per-forward reference of the two below
    "one-visit": {"schedule": "one-visit"},
    "offload-disk": {"offload": "disk"},  # each rank's blocks in its own files
    "fzoo-3": {"estimator": "fzoo", "n_queries": 3},
    "hizoo": {"estimator": "hizoo", "optimizer": "hizoo", "hessian_smooth": 0.1},
}

counters = install_comm_counters()


def dataset(n=64, length=12):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, 64, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def run_hf() -> torch.nn.Module:
    from transformers import Trainer, TrainingArguments

    from zo_plugins import ZOCallback

    model = tiny_hf_model("opt", dropout=0.1)
    args = TrainingArguments(
        output_dir=os.path.join(OUT_DIR, "trainer"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-3,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
        logging_steps=1,
        ddp_backend="gloo",
        gradient_accumulation_steps=2,
    )
    cb = ZOCallback(**{"eps": 1e-3, **ZO})
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[cb]).train()
    return model, cb.optimizer


def run_plain(zo=None) -> torch.nn.Module:
    from zo_plugins import ZOOptimizer

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = tiny_hf_model("opt", dropout=0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    zo = dict(ZO if zo is None else zo)
    if zo.get("offload") == "disk":
        zo["offload_dir"] = os.path.join(OUT_DIR, f"blocks-rank{dist.get_rank()}")
    opt = ZOOptimizer(model, lr=zo.pop("lr", 1e-3), eps=1e-3, **zo)
    data = dataset()
    rank = dist.get_rank()
    for step in range(STEPS):
        rows = data[(2 * step + rank) * 4 : (2 * step + rank + 1) * 4]  # each rank its own shard
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        opt.step(lambda: ddp(**batch).loss)
    opt.flush()
    return model, opt


def snapshot(model, opt) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "world": dist.get_world_size(),
        "grads_per_step": opt.grads_per_step,
        "projected_grads": opt.last_step.projected_grads,
        "rejected_steps": opt.rejected_steps,
        **{k: (list(v) if isinstance(v, list) else v) for k, v in counters.items()},
    }


def run_quantized(backend: str):
    """DDP over a tiny quantized Llama, ZO training its scales (zo_plugins.quant)."""
    from zo_testing import tiny_llama_dir, tiny_quantized_llama

    from zo_plugins import ZOOptimizer
    from zo_plugins.quant import describe

    tiny_llama_dir()  # save_pretrained writes on rank 0 only once a process group exists
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    model = tiny_quantized_llama(backend)
    # torchao's Int8Tensor has no aten.view, which DDP's initial broadcast of every parameter
    # needs; every rank loaded the same checkpoint, so skip that broadcast (init_sync=False)
    ddp = torch.nn.parallel.DistributedDataParallel(model, init_sync=not backend.startswith("torchao"))
    rms = next(iter(describe(model).values()))["rms"]
    opt = ZOOptimizer(model, lr=30 * rms * rms, eps=1e-2 * rms, quantized="scales")
    data = dataset()
    rank = dist.get_rank()
    for step in range(STEPS):
        rows = data[(2 * step + rank) * 4 : (2 * step + rank + 1) * 4]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        opt.step(lambda: ddp(**batch).loss)
    return model, opt


def quantized_snapshot(model, opt) -> dict:
    from zo_plugins.quant import frozen_codes, scales_state_dict

    out = snapshot(model, opt)
    out["params"] = {**scales_state_dict(model), **frozen_codes(model)}
    return out


if MODE == "quantized":  # one launch, every installed back-end
    from zo_testing import quant_available

    result = {}
    for backend in ("bnb-nf4", "torchao-int8"):
        if not quant_available(backend):
            continue
        for k in ("scalar_all_reduces", "scalar_numel", "ddp_bucket_all_reduces"):
            counters[k] = 0
        counters["local_grads"] = []
        result[backend] = quantized_snapshot(*run_quantized(backend))
elif MODE == "methods":  # one launch, every method; counters are per method
    result = {}
    for name, zo in METHODS.items():
        for k in ("scalar_all_reduces", "scalar_numel", "ddp_bucket_all_reduces"):
            counters[k] = 0
        counters["local_grads"] = []
        result[name] = snapshot(*run_plain(zo))
else:
    result = snapshot(*(run_hf() if MODE == "hf" else run_plain()))
rank = dist.get_rank()
torch.save(result, os.path.join(OUT_DIR, f"rank{rank}.pt"))
# Leave the process group cleanly: tearing gloo down in interpreter-exit destructors can
# abort ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
