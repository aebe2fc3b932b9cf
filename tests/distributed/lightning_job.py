"""One rank of a two-process Lightning ZO run (launched by test_lightning_ddp.py through
torchrun, so Lightning finds a TorchElastic environment and launches nothing itself).
Writes this rank's final parameters and communication counters to OUT_DIR."""

from __future__ import annotations

import os
import sys
import warnings

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from zo_testing import VOCAB, install_comm_counters, tiny_hf_model  # noqa: E402

MODE, OUT_DIR = sys.argv[1], sys.argv[2]
STEPS = 4
warnings.filterwarnings("ignore")

counters = install_comm_counters()

import lightning.pytorch as pl  # noqa: E402

from zo_plugins.lightning import ZODDPStrategy, ZOLightningCallback  # noqa: E402


class CausalLM(pl.LightningModule):
    """An unchanged LightningModule around a tiny OPT (with dropout: masks must agree too)."""

    def __init__(self):
        super().__init__()
        self.model = tiny_hf_model("opt", dropout=0.1)

    def on_train_start(self):  # Lightning's own set-up collectives (2 small ones) don't count
        counters.update(scalar_all_reduces=0, scalar_numel=0, local_grads=[])

    def training_step(self, batch, batch_idx):
        loss = self.model(input_ids=batch, labels=batch).loss
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def main() -> None:
    g = torch.Generator().manual_seed(0)
    data = torch.randint(2, VOCAB, (64, 12), generator=g)
    loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=False)
    if MODE == "strategy":
        extra = dict(strategy=ZODDPStrategy(eps=1e-3, process_group_backend="gloo"))
    else:
        from lightning.pytorch.strategies import DDPStrategy

        extra = dict(
            strategy=DDPStrategy(process_group_backend="gloo"), callbacks=[ZOLightningCallback(eps=1e-3)]
        )
    module = CausalLM()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        max_steps=STEPS,
        accumulate_grad_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **extra,
    )
    trainer.fit(module, loader)
    rank = dist.get_rank()
    torch.save(
        {
            "params": {n: p.detach().clone() for n, p in module.model.named_parameters()},
            "grads": [n for n, p in module.named_parameters() if p.grad is not None],
            "world": dist.get_world_size(),
            "global_step": trainer.global_step,
            "logged": sorted(trainer.logged_metrics),
            **counters,
        },
        os.path.join(OUT_DIR, f"rank{rank}.pt"),
    )


main()
