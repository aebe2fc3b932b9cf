"""One rank of a perturbation-parallel ZO run (launched by test_perturbation_parallel.py).

Modes:

* ``plain`` (torchrun, 2k processes): ``ZOOptimizer(..., perturbation_parallel=True)`` on
  ``pair_sampler`` shards, for every configuration of ``CONFIGS``; before each step every rank
  also computes the single-process projected gradient of each pair's batch at the current
  weights (``estimate`` on a copy), so the test can compare the applied gradient with their mean.
  Then ``rng-mismatch``: one rank draws an extra random number, the step must stop untouched.
* ``hf`` (accelerate launch, 2 processes: one pair) / ``hf-ref`` (one process, no pairs):
  ``ZOTrainer`` on the same data; the weights must agree bit for bit.
* ``lightning`` (torchrun, 2 processes): ``ZODDPStrategy(perturbation_parallel=True)`` with
  gradient accumulation, and in the same launch ``ZOStrategy`` on one device (each rank alone,
  all the data) as the single-process reference.
* ``two-ranks`` (torchrun, 2 processes): fsdp_job.py's checks and ``lightning`` in one launch
  (what the tests run: a launch costs more than the runs).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from zo_testing import VOCAB, install_comm_counters, lm_dataset, tiny_hf_model  # noqa: E402

STEPS = 3
warnings.filterwarnings("ignore")
counters: dict = {}  # install_comm_counters() in main

CONFIGS = {
    "dropout": {},
    "in-place-tensors": {"tensors": True},
    "rademacher-3": {"distribution": "rademacher", "n_queries": 3},
    "maximize-momentum": {"maximize": True, "optimizer": "zo-sgd-momentum"},
}


def collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def run_plain() -> dict:
    from zo_plugins import ZOOptimizer
    from zo_plugins.distributed import pair_layout, pair_sampler

    dist.init_process_group("gloo")
    lay = pair_layout()
    data = lm_dataset(n=32)
    out = {}
    for name, cfg in CONFIGS.items():
        cfg = dict(cfg)
        tensors = cfg.pop("tensors", False)
        model = tiny_hf_model("opt", dropout=0.1)
        ref = copy.deepcopy(model)
        if tensors:  # no model: in-place perturbation of float32 tensors
            opt = ZOOptimizer(list(model.parameters()), lr=1e-2, perturbation_parallel=True, **cfg)
            probe = ZOOptimizer(list(ref.parameters()), lr=1e-2, all_reduce=False, **cfg)
        else:
            opt = ZOOptimizer(model, lr=1e-2, perturbation_parallel=True, **cfg)
            probe = ZOOptimizer(ref, lr=1e-2, all_reduce=False, **cfg)
        mine = torch.utils.data.DataLoader(
            data, batch_size=4, collate_fn=collate, sampler=pair_sampler(data, shuffle=False)
        )
        shards = [  # every pair's batches, to compute the single-process reference
            list(
                torch.utils.data.DataLoader(
                    data,
                    batch_size=4,
                    collate_fn=collate,
                    sampler=torch.utils.data.DistributedSampler(data, lay.pairs, q, shuffle=False),
                )
            )
            for q in range(lay.pairs)
        ]
        counters.update(scalar_all_reduces=0, scalar_numel=0, local_grads=[])
        applied, expected, seen = [], [], []
        for step, batch in zip(range(STEPS), mine):
            seen.append(int(batch["input_ids"].sum()))
            gs = []
            for q in range(lay.pairs):
                with torch.no_grad():
                    for a, b in zip(ref.parameters(), model.parameters()):
                        a.copy_(b)
                torch.manual_seed(100 + step)  # the masks the pair draws (its RNG is seeded alike)
                gs.append(probe.estimate(lambda q=q: ref(**shards[q][step]).loss, step=step).projected_grads)
            expected.append([sum(g[i] for g in gs) / len(gs) for i in range(len(gs[0]))])
            torch.manual_seed(100 + step)
            opt.step(lambda: model(**batch).loss)
            applied.append(opt.last_step.projected_grads)
        out[name] = {
            "params": {n: p.detach().clone() for n, p in model.named_parameters()},
            "applied": applied,
            "expected": expected,
            "seen": seen,
            "loss_plus": opt.last_step.loss_plus,
            "loss_minus": opt.last_step.loss_minus,
            "all_reduces": counters["scalar_all_reduces"],
            "numel": counters["scalar_numel"],
            "n_queries": opt.config.n_queries,
            "mode": opt.perturbation_mode,
        }
    # a rank whose RNG drifts from its partner's: the step stops before any weight changes
    model = tiny_hf_model("opt", dropout=0.1)
    opt = ZOOptimizer(model, lr=1e-2, perturbation_parallel=True)
    batch = collate(data[:4])
    opt.step(lambda: model(**batch).loss)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if lay.rank == 1:
        torch.rand(1)
    try:
        opt.step(lambda: model(**batch).loss)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    out["rng-mismatch"] = {
        "error": error,
        "unchanged": all(torch.equal(before[n], p) for n, p in model.named_parameters()),
    }
    # a non-finite loss on one rank skips the step on every rank
    model = tiny_hf_model("opt")
    opt = ZOOptimizer(model, lr=1e-2, perturbation_parallel=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(lambda: model(**batch).loss * (float("nan") if lay.rank == 3 else 1.0))
    out["nan-skip"] = {
        "skipped": opt.last_step.skipped,
        "skipped_steps": opt.skipped_steps,
        "unchanged": all(torch.equal(before[n], p) for n, p in model.named_parameters()),
    }
    return out


def run_hf(pairs: bool, out_dir: str) -> dict:
    from pathlib import Path

    from zo_testing import args_for

    from zo_plugins import ZOTrainer

    model = tiny_hf_model("opt", dropout=0.1)
    args = args_for(Path(out_dir), ddp_backend="gloo" if pairs else None, max_steps=STEPS)
    trainer = ZOTrainer(
        model=model,
        args=args,
        train_dataset=lm_dataset(n=32),
        zo_config={"eps": 1e-3, "perturbation_parallel": pairs},
    )
    trainer.train()
    opt = trainer._zo_callback().optimizer
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "history": [
            {k: v for k, v in h.items() if k in ("loss", "projected_grad", "loss_plus", "loss_minus")}
            for h in trainer.state.log_history
        ],
        "world": dist.get_world_size() if dist.is_initialized() else 1,
        "all_reduces": counters["scalar_all_reduces"],
        "steps": opt.step_count,
    }


def run_lightning() -> dict:
    import lightning.pytorch as pl

    from zo_plugins.lightning import ZODDPStrategy, ZOStrategy

    seen: list[int] = []
    grads: list[list[float]] = []

    class CausalLM(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_hf_model("opt", dropout=0.1)

        def on_train_start(self):  # Lightning's own set-up collectives don't count
            counters.update(scalar_all_reduces=0, scalar_numel=0, local_grads=[])
            torch.manual_seed(1)  # DDP's set-up re-seeds the RNG: start both runs' dropout alike

        def training_step(self, batch, batch_idx):
            seen.append(int(batch.sum()))  # once per forward
            return self.model(input_ids=batch, labels=batch).loss

        def on_before_zero_grad(self, optimizer):
            grads.append(self.trainer.strategy.zo_optimizer.last_step.projected_grads)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(2, VOCAB, (32, 12), generator=g)
    out = {}
    for name in ("pairs", "single"):
        seen.clear()
        grads.clear()
        pl.seed_everything(0, verbose=False)
        module = CausalLM()
        if name == "pairs":
            strategy = ZODDPStrategy(eps=1e-3, perturbation_parallel=True, process_group_backend="gloo")
            extra = dict(devices=2)
        else:  # every rank alone on all the data: the single-process run (its all-reduce averages equal values)
            strategy, extra = ZOStrategy(eps=1e-3), dict(devices=1)
        trainer = pl.Trainer(
            accelerator="cpu",
            max_steps=STEPS,
            accumulate_grad_batches=int(os.environ.get("ZO_GA", "2")),
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            strategy=strategy,
            **extra,
        )
        # Lightning shuffles the training data through the DistributedSampler it injects for the
        # pairs; the reference draws the same order from the same sampler (one shard: all the data)
        sampler = None if name == "pairs" else torch.utils.data.DistributedSampler(data, 1, 0, seed=0)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4, sampler=sampler))
        out[name] = {
            "params": {n: p.detach().clone() for n, p in module.model.named_parameters()},
            "seen": list(seen),
            "grads": list(grads),
            "global_step": trainer.global_step,
            "all_reduces": counters["scalar_all_reduces"],
            "local": counters["local_grads"][-STEPS:],
        }
    return out


def run_two_ranks() -> dict:
    """Every two-process torchrun check of the FSDP2 and pair tests in one launch."""
    import fsdp_job

    fsdp_job.counters = counters
    dist.init_process_group("gloo")
    return {
        "fsdp-plain": fsdp_job.run_plain(),
        "fsdp-lightning": fsdp_job.run_lightning(),
        "pairs-lightning": run_lightning(),
    }


def main() -> None:
    global counters
    mode, out_dir = sys.argv[1], sys.argv[2]
    counters = install_comm_counters()
    if mode == "plain":
        result = run_plain()
    elif mode in ("hf", "hf-ref"):
        result = run_hf(pairs=mode == "hf", out_dir=out_dir)
    elif mode == "lightning":
        result = run_lightning()
    else:
        result = run_two_ranks()
    rank = dist.get_rank() if dist.is_initialized() else 0
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
