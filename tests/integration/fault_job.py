"""A training process for the kill -9 tests: ``python fault_job.py MODE OUT [--kill-at N] [--resume]``.

MODE ``hf``: stock Trainer + ZOCallback (checkpoints every 2 steps, trajectory log).
MODE ``plain``: a plain loop with ZOOptimizer and zo_plugins.checkpoint (every 2 steps).
The final weights go to OUT/final.safetensors; ``--kill-at N`` SIGKILLs the process after
optimizer step N.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from zo_testing import VOCAB, tiny_hf_model  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("mode", choices=["hf", "plain"])
ap.add_argument("out")
ap.add_argument("--kill-at", type=int, default=-1)
ap.add_argument("--resume", action="store_true")
args = ap.parse_args()
STEPS = 8


def dataset(n=64, length=12):
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(n):
        ids = torch.randint(2, VOCAB, (length,), generator=g)
        rows.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return rows


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


model = tiny_hf_model("opt", dropout=0.1)
if not args.resume:
    model.save_pretrained(os.path.join(args.out, "base"))
traj = os.path.join(args.out, "traj.zot")

if args.mode == "hf":
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from zo_plugins import ZOCallback

    class Killer(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):
            if state.global_step == args.kill_at:
                die()

    targs = TrainingArguments(
        output_dir=os.path.join(args.out, "run"),
        per_device_train_batch_size=4,
        max_steps=STEPS,
        learning_rate=1e-3,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        gradient_accumulation_steps=2,
    )
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=dataset(),
        callbacks=[ZOCallback(seed=3, trajectory_path=traj), Killer()],
    )
    trainer.train(resume_from_checkpoint=True if args.resume else None)
else:
    from zo_plugins import ZOOptimizer
    from zo_plugins.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint

    data = dataset()
    opt = ZOOptimizer(model, lr=1e-3, seed=3, trajectory_path=traj)
    ckdir = os.path.join(args.out, "ckpt")
    if args.resume:
        last = latest_checkpoint(ckdir)
        meta = load_checkpoint(last, model, opt)
        torch.set_rng_state(torch.tensor(meta["rng"], dtype=torch.uint8))
    else:
        torch.manual_seed(0)
    while opt.step_count < STEPS:
        t = opt.step_count
        rows = data[4 * t : 4 * t + 4]
        batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        opt.step(lambda: model(**batch).loss)
        if opt.step_count % 2 == 0:
            save_checkpoint(
                os.path.join(ckdir, f"checkpoint-{opt.step_count}"),
                model,
                opt,
                rng=torch.get_rng_state().tolist(),
            )
        if opt.step_count == args.kill_at:
            die()
    opt.close()

save_file(
    {n: p.detach().contiguous() for n, p in model.named_parameters()},
    os.path.join(args.out, "final.safetensors"),
)
