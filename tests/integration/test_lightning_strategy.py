"""ZOStrategy / ZOLightningCallback in real Lightning 2.6 loops on CPU: an unchanged
LightningModule trains, the update is the core's, schedulers and param groups are honoured,
gradient accumulation draws one direction per optimizer step, resume is bit-exact, logging
records each value once, and the precision plugins run."""

from __future__ import annotations

import csv
import logging
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from zo_testing import assert_bit_identical, params_snapshot

L = pytest.importorskip("lightning.pytorch")

from zo_plugins import ZOOptimizer  # noqa: E402
from zo_plugins.lightning import ZOLightningCallback, ZOStrategy  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def regression_data(n: int = 32, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    w = torch.randn(8, 1, generator=g)
    return TensorDataset(x, x @ w + 0.01 * torch.randn(n, 1, generator=g))


class Regression(L.LightningModule):
    """A plain LightningModule that knows nothing about ZO."""

    def __init__(self, lr=0.05, weight_decay=0.0, lr_lambda=None, frozen_group_lr=None, log_loss=True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 1))
        self.lr, self.weight_decay, self.lr_lambda = lr, weight_decay, lr_lambda
        self.frozen_group_lr, self.log_loss = frozen_group_lr, log_loss
        self.log_calls: Counter = Counter()
        self.before_optimizer_step = 0

    def log(self, name, value, *args, **kwargs):  # counts what really reaches Lightning
        self.log_calls[name] += 1
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self.net(x), y)
        if self.log_loss:
            self.log("train_loss", loss)
        return loss

    def on_before_optimizer_step(self, optimizer):
        self.before_optimizer_step += 1

    def configure_optimizers(self):
        if self.frozen_group_lr is not None:
            groups = [
                {"params": self.net[0].parameters()},
                {"params": self.net[2].parameters(), "lr": self.frozen_group_lr},
            ]
        else:
            groups = self.parameters()
        opt = torch.optim.SGD(groups, lr=self.lr, weight_decay=self.weight_decay)
        if self.lr_lambda is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_lambda)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def full_loss(model: Regression, data: TensorDataset) -> float:
    with torch.no_grad():
        x, y = data.tensors
        return float(nn.functional.mse_loss(model.net(x.to(model.dtype)).float(), y))


def trainer(**kw) -> L.Trainer:
    args = dict(
        accelerator="cpu",
        devices=1,
        max_steps=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        strategy=ZOStrategy(eps=1e-3),
    )
    args.update(kw)
    return L.Trainer(**args)


def loader(batch_size=8, n=32) -> DataLoader:
    return DataLoader(regression_data(n), batch_size=batch_size, shuffle=False)


def test_unchanged_module_trains_without_grad():
    data = regression_data(32)
    model = Regression(lr=0.01)
    before = params_snapshot(model)
    loss0 = full_loss(model, data)
    t = trainer(max_steps=60)
    t.fit(model, loader())
    assert all(p.grad is None for p in model.parameters()), "ZO must not allocate .grad"
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert full_loss(model, data) < 0.7 * loss0
    assert t.global_step == 60
    assert model.before_optimizer_step == 60, "on_before_optimizer_step must run once per step"
    for key in ("projected_grad", "loss_plus", "loss_minus", "train_loss"):
        assert key in t.logged_metrics, key


def test_update_equals_core_update():
    model = Regression(lr=0.05, weight_decay=0.1, log_loss=False)
    ref = Regression(lr=0.05, weight_decay=0.1, log_loss=False)
    t = trainer(max_steps=1, strategy=ZOStrategy(eps=1e-2, seed=7))
    t.fit(model, loader())
    opt = ZOOptimizer(ref, lr=0.05, eps=1e-2, seed=7, weight_decay=0.1)
    batch = next(iter(loader()))
    opt.step(lambda: ref.training_step(batch, 0))
    assert_bit_identical(params_snapshot(model), params_snapshot(ref))
    assert t.strategy.zo_optimizer.last_step.projected_grad == opt.last_step.projected_grad


def test_scheduler_and_param_groups_are_honoured():
    # the scheduler sets lr to 0 from step 2 on: four steps must equal two steps bit for bit
    # (out of place: an in-place float32 round trip may move a weight by an ulp)
    exact = dict(strategy=ZOStrategy(perturbation="out-of-place"))
    four = Regression(lr=0.05, lr_lambda=lambda s: 1.0 if s < 2 else 0.0, frozen_group_lr=0.0)
    two = Regression(lr=0.05, lr_lambda=lambda s: 1.0 if s < 2 else 0.0, frozen_group_lr=0.0)
    init = params_snapshot(four)
    trainer(max_steps=4, **exact).fit(four, loader())
    exact = dict(strategy=ZOStrategy(perturbation="out-of-place"))
    trainer(max_steps=2, **exact).fit(two, loader())
    assert_bit_identical(params_snapshot(four), params_snapshot(two))
    # the second group (lr=0, no decay) never moves; the first does
    assert torch.equal(four.net[2].weight, init["net.2.weight"])
    assert not torch.equal(four.net[0].weight, init["net.0.weight"])


def test_accumulation_draws_one_direction_per_optimizer_step():
    big = Regression(lr=0.05, log_loss=False)
    acc = Regression(lr=0.05, log_loss=False)
    # float64: the only difference left is summation order, far below a step's size
    t_big = trainer(max_steps=3, precision="64-true")
    t_acc = trainer(max_steps=3, accumulate_grad_batches=2, precision="64-true")
    t_big.fit(big, loader(batch_size=8))
    t_acc.fit(acc, loader(batch_size=4))
    assert t_acc.global_step == 3
    assert t_acc.strategy.zo_optimizer.last_step.step == 2
    # mean of two half-batch losses == the full-batch loss: same estimate up to rounding
    for (n, a), b in zip(acc.named_parameters(), big.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=n)
    init = Regression().double()
    moved = max((a - p).abs().max().item() for a, p in zip(acc.parameters(), init.parameters()))
    assert moved > 1e-3


def test_resume_is_bit_exact(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    lam = lambda s: 1.0 / (1 + s)  # noqa: E731 - the scheduler state must be restored too
    full = Regression(lr=0.05, lr_lambda=lam)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(max_steps=6, callbacks=[ckpt], enable_checkpointing=True).fit(full, loader(n=24))
    path = tmp_path / "step=3.ckpt"
    assert path.exists()
    assert "zo_plugins" in torch.load(path, weights_only=False)
    resumed = Regression(lr=0.05, lr_lambda=lam)
    t = trainer(max_steps=6)
    t.fit(resumed, loader(n=24), ckpt_path=path)
    assert t.global_step == 6
    assert_bit_identical(params_snapshot(full), params_snapshot(resumed))
    # and a different seed is refused rather than silently drawing other directions
    with pytest.raises(ValueError, match="seed"):
        trainer(max_steps=6, strategy=ZOStrategy(seed=1)).fit(Regression(), loader(n=24), ckpt_path=path)


def test_logging_records_user_values_once_and_unperturbed(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    model = Regression(lr=0.05)
    t = trainer(max_steps=4, logger=CSVLogger(tmp_path, name="run"))
    t.fit(model, loader())
    assert model.log_calls["train_loss"] == 4, "the user's self.log must reach Lightning once per batch"
    rows = list(csv.DictReader(open(next(Path(tmp_path).rglob("metrics.csv")))))
    rows = [r for r in rows if r.get("projected_grad")]
    assert len(rows) == 4
    for r in rows:
        # the logged user value is the mean over the two perturbed forwards (= f(theta) + O(eps^2))
        mean = (float(r["loss_plus"]) + float(r["loss_minus"])) / 2
        assert float(r["train_loss"]) == pytest.approx(mean, rel=1e-6)
        assert float(r["loss_plus"]) != float(r["loss_minus"])


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true", "16-mixed"])
def test_precision_variants_run(precision):
    model = Regression(lr=0.05, log_loss=False)
    before = params_snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 16-mixed on CPU: Lightning falls back to bf16-mixed
        # eps 1e-2: a 1e-3 shift of these O(0.3) weights is below bf16 resolution (L+ == L-)
        t = trainer(max_steps=3, precision=precision, strategy=ZOStrategy(eps=1e-2))
        t.fit(model, loader())
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(before[n].to(p.dtype), p) for n, p in model.named_parameters())
    expected = torch.bfloat16 if precision == "bf16-true" else torch.float32
    assert model.net[0].weight.dtype == expected
    assert t.strategy.zo_optimizer.skipped_steps == 0


def test_grad_scaler_is_divided_out():
    """fp16 autocast with a GradScaler (what 16-mixed means on GPU): no 'No inf checks were
    recorded' assertion, and the loss scale (65536) does not leak into the update."""
    from lightning.pytorch.plugins import MixedPrecision

    ref = Regression(lr=0.05, log_loss=False)
    trainer(max_steps=2).fit(ref, loader())
    scaled = Regression(lr=0.05, log_loss=False)
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    t = trainer(max_steps=2, plugins=[plugin])
    t.fit(scaled, loader())
    init = params_snapshot(Regression())
    step_ref = max((p - init[n]).abs().max().item() for n, p in ref.named_parameters())
    step_fp16 = max((p - init[n]).abs().max().item() for n, p in scaled.named_parameters())
    assert 0.5 < step_fp16 / step_ref < 2.0


def test_gradient_clipping_settings_do_not_break(caplog):
    model = Regression(lr=0.05)
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        trainer(max_steps=2, gradient_clip_val=1.0).fit(model, loader())
    assert "no effect under ZO" in caplog.text
    assert model.before_optimizer_step == 2


def test_callback_equips_auto_strategy_identically():
    a, b = Regression(lr=0.05), Regression(lr=0.05)
    trainer(max_steps=3).fit(a, loader())
    t = trainer(max_steps=3, strategy="auto", callbacks=[ZOLightningCallback(eps=1e-3)])
    t.fit(b, loader())
    assert_bit_identical(params_snapshot(a), params_snapshot(b))
    assert type(t.strategy).__name__ == "SingleDeviceStrategy"
    assert "training_step" not in vars(t.strategy), "the bound ZO methods are removed at teardown"
    assert all(p.grad is None for p in b.parameters())


def test_strategy_takes_device_from_trainer_and_registers_name():
    t = trainer(strategy="zo")
    assert isinstance(t.strategy, ZOStrategy)
    assert t.strategy.root_device == torch.device("cpu")
    with pytest.raises(ValueError, match="ZODDPStrategy"):
        trainer(devices=2)


def test_manual_optimization_is_refused():
    class Manual(Regression):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(ValueError, match="automatic optimization"):
        trainer(max_steps=1).fit(Manual(), loader())


def test_missing_lightning_names_the_extra():
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['lightning'] = None; sys.modules['lightning.pytorch'] = None\n"
        "try:\n    from zo_plugins.lightning import ZOStrategy\nexcept ImportError as e:\n    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "pip install 'zo-plugins[lightning]'" in out


def test_trajectory_from_lightning_replays_bit_identically(tmp_path):
    """ZOStrategy(trajectory_path=...) logs the run; replay rebuilds the weights from a fresh
    module's starting weights (accumulation and a scheduler included)."""
    from zo_plugins import replay

    module = Regression(lr=0.05, lr_lambda=lambda step: 1.0 / (1 + step))
    log = tmp_path / "run.zot"
    t = trainer(
        strategy=ZOStrategy(eps=1e-3, trajectory_path=str(log)), max_steps=4, accumulate_grad_batches=2
    )
    t.fit(module, DataLoader(regression_data(), batch_size=4))
    fresh = Regression()
    before = params_snapshot(fresh)
    assert any(not torch.equal(before[n], p) for n, p in params_snapshot(module).items())
    replay(fresh, log)
    assert_bit_identical(params_snapshot(module), params_snapshot(fresh))


class DropoutRegression(Regression):
    def __init__(self, **kw):
        super().__init__(**kw)
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.3), nn.Tanh(), nn.Linear(16, 1))


def test_resume_with_dropout_is_bit_exact(tmp_path):
    """The strategy checkpoints the global RNG (Lightning does not), so the dropout masks
    after a resume are those of the uninterrupted run."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    torch.manual_seed(123)
    full = DropoutRegression(lr=0.05)
    ckpt = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1, filename="{step}")
    trainer(max_steps=6, callbacks=[ckpt], enable_checkpointing=True).fit(full, loader(n=24))
    torch.manual_seed(999)  # whatever the process did in between
    resumed = DropoutRegression(lr=0.05)
    trainer(max_steps=6).fit(resumed, loader(n=24), ckpt_path=tmp_path / "step=3.ckpt")
    assert_bit_identical(params_snapshot(full), params_snapshot(resumed))


@pytest.mark.parametrize("filtered", [True, False])
def test_backbone_unfrozen_by_a_finetuning_callback_trains_from_then_on(filtered):
    """Lightning's BaseFinetuning freezes the backbone, then unfreezes it at epoch 1 and calls
    optimizer.add_param_group: the ZO strategy picks the new group up (its tensors are
    perturbed and updated from that step on, with the group's own learning rate).  When
    configure_optimizers already held the frozen tensors, BaseFinetuning adds no group and the
    tensors train in their group, as under backprop."""
    from lightning.pytorch.callbacks import BaseFinetuning

    class UnfreezeAtEpoch1(BaseFinetuning):
        def freeze_before_training(self, pl_module):
            self.freeze(pl_module.net[0])

        def finetune_function(self, pl_module, epoch, optimizer):
            if epoch == 1:
                self.unfreeze_and_add_param_group(pl_module.net[0], optimizer, lr=0.02)

    snaps = {}

    class Snap(L.Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            snaps[trainer.current_epoch] = params_snapshot(pl_module)

    class Filtered(Regression):
        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)

    model = (Filtered if filtered else Regression)(lr=0.05, log_loss=False)
    before = params_snapshot(model)
    t = trainer(max_steps=8, strategy=ZOStrategy(eps=1e-3), callbacks=[UnfreezeAtEpoch1(), Snap()])
    t.fit(model, loader(batch_size=8, n=32))  # 4 steps per epoch
    assert torch.equal(snaps[0]["net.0.weight"], before["net.0.weight"]), "frozen during epoch 0"
    assert not torch.equal(snaps[0]["net.2.weight"], before["net.2.weight"])
    assert not torch.equal(snaps[1]["net.0.weight"], snaps[0]["net.0.weight"]), "trained after unfreezing"
    opt = t.strategy.zo_optimizer
    assert [g["lr"] for g in opt.param_groups] == [0.05, 0.02 if filtered else 0.05]
    assert {s.name for s in opt.specs()} == {"net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
