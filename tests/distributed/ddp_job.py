"""One rank of a multi-process ZO run (launched by test_multiprocess.py through torchrun or
accelerate launch).  Writes this rank's final parameters and counters to OUT_DIR."""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from zo_testing import install_comm_counters, tiny_hf_model  # noqa: E402

MODE, OUT_DIR = sys.argv[1], sys.argv[2]
STEPS = 4

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
    Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[ZOCallback(eps=1e-3)]).train()
    return model


def run_plain() -> torch.nn.Module:
    from zo_plugins import ZOOptimizer

    dist.init_process_group("gloo")
    model = tiny_hf_model("opt", dropout=0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    opt = ZOOptimizer(model, lr=1e-3, eps=1e-3)
    data = dataset()
    rank = dist.get_rank()
    for step in range(STEPS):
        rows = data[(2 * step + rank) * 4 : (2 * step + rank + 1) * 4]  # each rank its own shard
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        opt.step(lambda: ddp(**batch).loss)
    return model


model = run_hf() if MODE == "hf" else run_plain()
rank = dist.get_rank()
torch.save(
    {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": [n for n, p in model.named_parameters() if p.grad is not None],
        "world": dist.get_world_size(),
        **counters,
    },
    os.path.join(OUT_DIR, f"rank{rank}.pt"),
)
# Leave the process group cleanly: tearing gloo down in interpreter-exit destructors can
# abort ("terminate called without an active exception").
dist.barrier()
dist.destroy_process_group()
