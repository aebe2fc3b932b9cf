"""One rank of an FSDP2 ZO run (launched through torchrun by test_fsdp.py, or by pairs_job.py's
``two-ranks`` mode, which runs these and its own Lightning run in one launch).

Mode ``plain``: for every configuration of ``CONFIGS``, a tiny OPT (dropout, a padding row) is
trained twice on the same batches: unsharded (``ZOOptimizer`` on a copy, no collective) and
FSDP2-sharded (``fully_shard`` per decoder layer and on the root, over a CPU mesh of all ranks).
Both ranks see the same data, so the sharded run must end with the unsharded run's weights.
Mode ``lightning``: ``ZOModelParallelStrategy`` (FSDP2 from ``configure_model``) against
``ZODDPStrategy`` on the same per-rank data.  Writes this rank's results to the output folder."""

from __future__ import annotations

import copy
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from zo_testing import VOCAB, install_comm_counters, tiny_batch, tiny_hf_model  # noqa: E402

STEPS = 3
warnings.filterwarnings("ignore")
counters: dict = {}  # install_comm_counters() in main (or the job that imports this one)

CONFIGS = {
    "out-of-place": {},
    "in-place": {"perturbation": "in-place"},
    "rademacher-adam": {"distribution": "rademacher", "optimizer": "zo-adam", "weight_decay": 0.01},
    "momentum-random-sparsity": {"optimizer": "zo-sgd-momentum", "sparsity": 0.5, "sparsity_mode": "random"},
    "forward-2": {"estimator": "forward", "n_queries": 2},
    "bf16": {"dtype": torch.bfloat16},
    "prefetch": {"prefetch": True},
    "mlp-uneven": {"mlp": True},  # 3- and 1-row tensors: uneven shards, an empty one on rank 1
    "fzoo-3": {"estimator": "fzoo", "n_queries": 3},  # one-sided probes, spread-normalised step
    "hizoo": {"estimator": "hizoo", "optimizer": "hizoo", "hessian_smooth": 0.1},  # a local shard of H
}


def mesh():
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dist.get_world_size(),))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1))


def shard(model: nn.Module, blocks, prefetch: bool = False) -> None:
    from torch.distributed.fsdp import fully_shard

    m = mesh()
    for block in blocks:
        fully_shard(block, mesh=m)
    fully_shard(model, mesh=m)
    if prefetch:  # forward prefetching: FSDP gathers the next layer before its hooks run
        for a, b in zip(blocks[:-1], blocks[1:]):
            a.set_modules_to_forward_prefetch([b])


def run_plain() -> dict:
    from zo_plugins import ZOOptimizer

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    out = {}
    for name, cfg in CONFIGS.items():
        cfg = dict(cfg)
        dtype, prefetch, is_mlp = (
            cfg.pop("dtype", torch.float32),
            cfg.pop("prefetch", False),
            cfg.pop("mlp", False),
        )
        if is_mlp:
            ref = mlp()
            x = torch.randn(8, 5, generator=torch.Generator().manual_seed(1))

            def batch(step, x=x):
                return {"x": x + step}

            def loss(m, b):
                return m(b["x"]).square().mean()
        else:
            ref = tiny_hf_model("opt", dtype=dtype, dropout=0.1)

            def batch(step):
                return tiny_batch("opt", seed=step)

            def loss(m, b):
                return m(**b).loss

        model = copy.deepcopy(ref)
        init = {n: p.detach().clone() for n, p in ref.named_parameters()}
        blocks = [m for m in model if list(m.parameters())] if is_mlp else list(model.model.decoder.layers)
        shard(model, blocks, prefetch)
        o_ref = ZOOptimizer(ref, lr=1e-2, eps=1e-3, all_reduce=False, **cfg)
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-3, **cfg)
        counters.update(scalar_all_reduces=0, scalar_numel=0)
        gs, gs_ref = [], []
        for step in range(STEPS):
            b = batch(step)
            torch.manual_seed(step)  # the same dropout masks in both runs
            o_ref.step(lambda: loss(ref, b))
            torch.manual_seed(step)
            opt.step(lambda: loss(model, b))
            gs_ref.append(o_ref.last_step.projected_grads)
            gs.append(opt.last_step.projected_grads)
        specs = opt.specs()
        out[name] = {
            "ref": {n: p.detach().clone() for n, p in ref.named_parameters()},
            "sharded": {n: p.full_tensor().detach().clone() for n, p in model.named_parameters()},
            "init": init,
            "g": gs,
            "g_ref": gs_ref,
            "mode": opt.perturbation_mode,
            "backend": opt.backend,
            "fell_back": sorted(opt.perturber.fell_back),
            "local_numel": sum(s.param.numel() for s in specs),
            "full_numel": sum(s.global_numel for s in specs),
            "all_reduces": counters["scalar_all_reduces"],
            "is_dtensor": all(type(p).__name__ == "DTensor" for p in model.parameters()),
        }
    return out


def run_lightning() -> dict:
    import lightning.pytorch as pl

    from zo_plugins.lightning import ZODDPStrategy, ZOModelParallelStrategy

    class CausalLM(pl.LightningModule):
        def __init__(self, sharded: bool):
            super().__init__()
            self.model = tiny_hf_model("opt", dropout=0.1)
            self.sharded = sharded

        def configure_model(self):
            if self.sharded:
                from torch.distributed.fsdp import fully_shard

                dp = self.device_mesh["data_parallel"]
                for layer in self.model.model.decoder.layers:
                    fully_shard(layer, mesh=dp)
                fully_shard(self.model, mesh=dp)

        def training_step(self, batch, batch_idx):
            return self.model(input_ids=batch, labels=batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    g = torch.Generator().manual_seed(0)
    data = torch.randint(2, VOCAB, (32, 12), generator=g)
    out = {}
    for name, strategy in (
        ("ddp", lambda: ZODDPStrategy(eps=1e-3, process_group_backend="gloo")),
        ("fsdp2", lambda: ZOModelParallelStrategy(eps=1e-3, process_group_backend="gloo")),
    ):
        torch.manual_seed(0)
        module = CausalLM(sharded=name == "fsdp2")
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            max_steps=STEPS,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            strategy=strategy(),
        )
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4, shuffle=False))
        params = {}
        for n, p in module.model.named_parameters():
            params[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
        out[name] = {
            "params": params,
            "global_step": trainer.global_step,
            "is_dtensor": [type(p).__name__ for p in module.model.parameters()][:1],
        }
    return out


def main() -> None:
    global counters
    mode, out_dir = sys.argv[1], sys.argv[2]
    counters = install_comm_counters()
    result = run_plain() if mode == "plain" else run_lightning()
    torch.save(result, os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
