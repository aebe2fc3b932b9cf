"""Every estimator x every update rule in every loop: the plain ``ZOOptimizer``, the stock HF
``Trainer`` with ``ZOCallback`` and a Lightning ``ZOStrategy``.

In each loop:
* a run interrupted after step 2 and resumed from its checkpoint ends bit-identical to the
  uninterrupted run (momentum buffers, Adam moments, the stateless-momentum history and the
  counters travel with the framework's own checkpoint);
* the loop applies the core's update: Lightning's run equals the plain optimizer's bit for
  bit, the HF Trainer's to float32 rounding of its loss (it normalises by the token count);
* 'zo-sgd-conservative' rejects the same steps the plain optimizer rejects (it is given a
  learning rate large enough to make some steps worse).

Every micro-batch is the same batch, so the loops see identical data whatever their order.
"""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback
from zo_testing import args_for, assert_bit_identical, params_snapshot, tiny_hf_model

from zo_plugins import ZOCallback, ZOOptimizer

L = pytest.importorskip("lightning.pytorch")
from zo_plugins.lightning import ZOStrategy  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

ESTIMATORS = ["spsa", "forward", "forward-grad", "cge", "rank", "fzoo", "hizoo"]
RULES = [
    ("zo-sgd", {}),
    ("zo-sgd-momentum", {}),
    ("zo-sgd-momentum", {"momentum_history": 2}),
    ("zo-sgd-sign", {}),
    ("zo-sgd-conservative", {}),
    ("zo-adam", {}),
    ("hizoo", {"hessian_smooth": 0.1}),
]
PAIRED = {"hizoo": "hizoo"}  # an estimator that serves one rule only, and that rule's estimator
LR = {"zo-sgd-sign": 1e-3, "zo-adam": 1e-3, "zo-sgd-conservative": 0.1}
STEPS, HALF = 4, 2


def combos():
    for est in ESTIMATORS:
        for rule, extra in RULES:
            if est == "cge" and rule != "zo-sgd":
                continue  # cge updates single coordinates: zo-sgd only (ZOConfig refuses the rest)
            if PAIRED.get(est, rule) != rule or PAIRED.get(rule, est) != est:
                continue  # HiZOO's probes and its rule only go together
            name = rule + ("-history" if "momentum_history" in extra else "")
            kw = dict(estimator=est, optimizer=rule, eps=1e-3, seed=3, **extra)
            if est in ("rank", "fzoo"):
                kw["n_queries"] = 3
            elif est != "cge":
                kw["n_queries"] = 2 if rule == "zo-sgd" else 1
            if est == "cge":
                kw["cge_coordinates"] = 4
            lr = LR.get(rule, 3e-2)
            if est == "fzoo" and rule == "zo-sgd-conservative":
                lr = 0.12  # FZOO's step does not grow with the loss: this lr makes some (not all) steps worse
            yield pytest.param(kw, lr, id=f"{est}-{name}")


ROW = None


def row():
    global ROW
    if ROW is None:
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(2, 64, (10,), generator=g)
        ROW = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return ROW


def batch(n=4):
    return {k: torch.stack([row()[k]] * n) for k in row()}


def model():
    return tiny_hf_model("opt", seed=11)


# ----------------------------------------------------------------------------- plain
class Wrapped(torch.nn.Module):
    """The model under the attribute a LightningModule gives it: the same parameter names,
    hence the same direction keys, as in the Lightning run."""

    def __init__(self):
        super().__init__()
        self.model = model()


def plain_run(kw, lr, steps=STEPS, resume_at=None, wrapped=False):
    make = Wrapped if wrapped else model
    m = make()
    opt = ZOOptimizer(m, lr=lr, **kw)
    b = batch()

    def closure():
        return (m.model if wrapped else m)(**b).loss

    for _ in range(resume_at or steps):
        opt.step(closure)
    if resume_at is not None:
        sd_model, sd_opt = params_snapshot(m), opt.state_dict()
        m = make()
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(sd_model[n])
        opt = ZOOptimizer(m, lr=lr, **kw)
        opt.load_state_dict(sd_opt)
        for _ in range(steps - resume_at):
            opt.step(closure)
    return params_snapshot(m), opt


# ----------------------------------------------------------------------------- HF
class _StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == HALF:
            control.should_training_stop = True


def hf_run(tmp, kw, lr, *, stop=False, resume=None):
    m = model()
    args = args_for(
        tmp,
        max_steps=STEPS,
        learning_rate=lr,
        save_strategy="steps",
        save_steps=HALF,
        logging_steps=1,
        seed=0,
    )
    cb = ZOCallback(**kw)
    callbacks = [cb] + ([_StopAt()] if stop else [])
    trainer = Trainer(model=m, args=args, train_dataset=[row()] * 64, callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return params_snapshot(m), cb.optimizer


# ----------------------------------------------------------------------------- Lightning
class HFModule(L.LightningModule):
    def __init__(self, lr):
        super().__init__()
        self.model = model()
        self.lr = lr

    def training_step(self, b, i):
        return self.model(**b).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def lightning_run(tmp, kw, lr, *, max_steps=STEPS, ckpt=None, save=False):
    module = HFModule(lr)
    callbacks = []
    if save:
        callbacks.append(
            L.callbacks.ModelCheckpoint(dirpath=tmp, filename="half", save_top_k=-1, every_n_train_steps=HALF)
        )
    trainer = L.Trainer(
        strategy=ZOStrategy(**kw),
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=save,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        default_root_dir=tmp,
    )
    loader = torch.utils.data.DataLoader([row()] * 64, batch_size=4, collate_fn=_collate)
    trainer.fit(module, loader, ckpt_path=ckpt)
    return params_snapshot(module), trainer.strategy.zo_optimizer


# ----------------------------------------------------------------------------- the matrix
@pytest.mark.parametrize("kw,lr", list(combos()))
def test_every_method_in_every_loop_resumes_bit_exactly(tmp_path, kw, lr):
    ref, ref_opt = plain_run(kw, lr)
    resumed, resumed_opt = plain_run(kw, lr, resume_at=HALF)
    assert_bit_identical(ref, resumed)
    start = params_snapshot(model())
    if ref_opt.rejected_steps < STEPS:
        assert any(not torch.equal(ref[n], start[n]) for n in ref), "the run must move the weights"

    # Lightning: the same update as the plain optimizer, bit for bit
    full, full_opt = lightning_run(tmp_path / "l-full", kw, lr)
    wrapped, wrapped_opt = plain_run(kw, lr, wrapped=True)
    assert_bit_identical(full, wrapped)
    lightning_run(tmp_path / "l-part", kw, lr, max_steps=HALF, save=True)
    ckpt = next((tmp_path / "l-part").glob("half*.ckpt"))
    part, part_opt = lightning_run(tmp_path / "l-resume", kw, lr, ckpt=str(ckpt))
    assert_bit_identical(part, full)

    # HF Trainer: resumed = uninterrupted bit for bit; = the plain update up to its loss rounding
    hf_full, hf_opt = hf_run(tmp_path / "hf-full", kw, lr)
    hf_run(tmp_path / "hf-part", kw, lr, stop=True)
    hf_resumed, hf_resumed_opt = hf_run(
        tmp_path / "hf-part", kw, lr, resume=str(tmp_path / "hf-part" / "out" / f"checkpoint-{HALF}")
    )
    assert_bit_identical(hf_resumed, hf_full)
    for n in ref:
        delta_ref, delta_hf = ref[n] - start[n], hf_full[n] - start[n]
        if kw["estimator"] == "cge":
            # one coordinate moved by eps changes the float32 loss by a few of its ulps: the HF
            # loss's other rounding shows at the percent level, so compare which weights moved
            assert torch.equal(delta_hf != 0, delta_ref != 0), n
        else:
            torch.testing.assert_close(
                delta_hf, delta_ref, rtol=2e-3, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
            )

    for opt, reference in [
        (resumed_opt, ref_opt),
        (hf_opt, ref_opt),
        (hf_resumed_opt, ref_opt),
        (full_opt, wrapped_opt),
        (part_opt, wrapped_opt),
    ]:
        assert opt.step_count == STEPS
        assert opt.rejected_steps == reference.rejected_steps  # counters survive the resume too
        assert opt.skipped_steps == reference.skipped_steps == 0
    if kw["optimizer"] == "zo-sgd-conservative":
        for reference in (ref_opt, wrapped_opt):
            assert reference.rejected_steps > 0, "the conservative rule must reject some steps here"


def test_a_registered_estimator_works_in_every_loop_untouched(tmp_path):
    """The layout's test: a new estimator is one function and a registry call, and the HF
    Trainer, Lightning and ZOOptimizer run it without a change to any of them."""
    from zo_plugins import Estimator, register_estimator
    from zo_plugins.core.registry import ESTIMATORS

    def three_point(p):  # (L(θ+εz) - L(θ-εz)) / 2ε with the unperturbed loss reported too
        base = p.unperturbed_loss()
        for seed in p.plan.seeds:
            lp, lm = p.loss(p.along(seed, p.eps)), p.loss(p.along(seed, -p.eps))
            p.est.losses_plus.append(lp)
            p.est.losses_minus.append(lm)
            p.est.projected_grads.append(p.sign * (lp - lm) / (2 * p.eps))
        p.est.losses_minus.append(base)

    if "test-three-point" not in ESTIMATORS:
        register_estimator(
            Estimator("test-three-point", three_point, forwards_per_step=lambda c: 3 * c.n_queries)
        )
    kw = dict(estimator="test-three-point", eps=1e-3, seed=3, n_queries=2)
    ref, _ = plain_run(kw, 3e-2)
    spsa, _ = plain_run(dict(kw, estimator="spsa"), 3e-2)
    assert_bit_identical(ref, spsa)  # the same projected gradients as spsa, one more forward a step
    full, _ = lightning_run(tmp_path / "l", kw, 3e-2)
    assert_bit_identical(full, plain_run(kw, 3e-2, wrapped=True)[0])
    hf, opt = hf_run(tmp_path / "hf", kw, 3e-2)
    assert opt.estimator.name == "test-three-point" and opt.step_count == STEPS
    start = params_snapshot(model())
    for n in ref:
        torch.testing.assert_close(hf[n] - start[n], ref[n] - start[n], rtol=2e-3, atol=1e-6)
