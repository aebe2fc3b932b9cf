"""Any exit from a step leaves the weights as they were before it and the model's forward as
it was: an exception or KeyboardInterrupt inside a ZO forward, an exception in the framework's
code between the forward and the update (the shape of TRL's failure), in HF and in Lightning.
After such an abort, training again equals a clean run and a stock Trainer works."""

from __future__ import annotations

import functools
import logging
import warnings

import pytest
import torch
from transformers import Trainer
from zo_testing import args_for, assert_bit_identical, lm_dataset, params_snapshot, tiny_hf_model

from zo_plugins import ZOCallback

L = pytest.importorskip("lightning.pytorch")
from zo_plugins.lightning import ZOLightningCallback, ZOStrategy  # noqa: E402

warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


def wrapper_installed(model) -> bool:
    return getattr(model.__dict__.get("forward"), "__zo_wrapper__", False)


class Boom(Exception):
    pass


class FailingForward:
    """Makes the model's real forward raise on its ``at``-th training call (counted from 1)."""

    def __init__(self, model, at, exc=Boom):
        self.model, self.at, self.exc, self.calls = model, at, exc, 0
        self.orig = type(model).forward

        @functools.wraps(self.orig)  # the Trainer reads the signature to keep the dataset's columns
        def forward(this, *a, **kw):
            if this.training and not torch.is_grad_enabled() and "labels" in kw:  # a ZO probe
                self.calls += 1
                if self.calls == self.at:
                    raise self.exc("boom inside the perturbed forward")
            return self.orig(this, *a, **kw)

        self.patched = forward

    def __enter__(self):
        type(self.model).forward = self.patched
        return self

    def __exit__(self, *exc):
        type(self.model).forward = self.orig


def train(model, tmp, **kw):
    args = args_for(tmp, max_steps=kw.pop("max_steps", 3))
    cb = ZOCallback(eps=1e-3, **kw)
    Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb]).train()
    return cb


# ----------------------------------------------------------------------------- HF
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
@pytest.mark.parametrize("at", [2, 3])  # probe calls: step 0 is calls 1 (+eps) and 2 (-eps), step 1 is 3, 4
def test_hf_exception_inside_a_step_leaves_weights_and_forward_intact(tmp_path, exc, at):
    done = (at - 1) // 2  # steps completed before the failing call
    ref = tiny_hf_model("opt")
    if done:
        train(ref, tmp_path / "ref", max_steps=done)
    model = tiny_hf_model("opt")
    with FailingForward(model, at, exc), pytest.raises(exc):
        train(model, tmp_path / "run")
    # the weights are those before the interrupted step, bit for bit
    assert_bit_identical(params_snapshot(ref), params_snapshot(model))
    assert not wrapper_installed(model), "the forward must be the model's own again"
    assert all(p.grad is None for p in model.parameters())


def test_hf_exception_between_forward_and_update_then_retrain_equals_a_clean_run(tmp_path):
    """The shape of the TRL failure: the Trainer's own code raises after the ZO forward
    returned and before the backward.  Nothing of ZO runs there, so the weights must already
    be unperturbed; a second train() must not stack a second offset; a stock Trainer used
    afterwards on the same model must run its real forward."""

    class RaisesAfterForward(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            raise Boom("the trainer failed after the forward")

    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    cb = ZOCallback(eps=1e-3)
    trainer = RaisesAfterForward(
        model=model, args=args_for(tmp_path / "a"), train_dataset=lm_dataset(), callbacks=[cb]
    )
    with pytest.raises(Boom):
        trainer.train()
    assert_bit_identical(before, params_snapshot(model))
    assert wrapper_installed(model)  # on_train_end never ran ...

    # ... a stock Trainer (no ZO) on the same model: the stale wrapper steps aside
    plain = Trainer(model=model, args=args_for(tmp_path / "b", max_steps=1), train_dataset=lm_dataset())
    plain.train()  # backprop + AdamW: would fail with a ZO forward ("does not require grad")
    assert not wrapper_installed(model)
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())

    # the same callback trains again and equals a clean run: no stacked offset
    again = tiny_hf_model("opt")
    ref = tiny_hf_model("opt")
    trainer = Trainer(model=again, args=args_for(tmp_path / "c"), train_dataset=lm_dataset(), callbacks=[cb])
    trainer.train()
    train(ref, tmp_path / "d", max_steps=4)
    assert_bit_identical(params_snapshot(ref), params_snapshot(again))


def test_hf_batch_without_labels_names_the_missing_labels(tmp_path):
    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    rows = [{k: v for k, v in r.items() if k != "labels"} for r in lm_dataset()]
    trainer = Trainer(model=model, args=args_for(tmp_path), train_dataset=rows, callbacks=[ZOCallback()])
    with pytest.raises(
        RuntimeError,
        match=r"no loss because the batch has no `labels` \(its keys: \['attention_mask', 'input_ids'\]\)",
    ):
        trainer.train()
    assert_bit_identical(before, params_snapshot(model))
    assert not wrapper_installed(model)


def test_hf_in_place_perturbation_restores_within_an_ulp_on_abort(tmp_path):
    from zo_testing import max_ulp_diff

    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    with FailingForward(model, 2), pytest.raises(Boom):
        train(model, tmp_path, perturbation="in-place")
    # in place, float32 round trips: within an ulp of the largest value met (|eps z| < 1e-2)
    for n, p in model.named_parameters():
        bound = torch.finfo(torch.float32).eps * (before[n].abs().max().item() + 1e-2)
        assert (p - before[n]).abs().max().item() <= bound, (n, max_ulp_diff(before[n], p))
    assert not wrapper_installed(model)


# ----------------------------------------------------------------------------- Lightning
class Module(L.LightningModule):
    def __init__(self, fail_at=None, exc=Boom):
        super().__init__()
        self.model = tiny_hf_model("opt")
        self.fail_at, self.exc, self.calls = fail_at, exc, 0

    def training_step(self, batch, i):
        self.calls += 1
        if self.calls == self.fail_at:
            raise self.exc("boom in training_step")
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=1e-3)


def _loader():
    rows = lm_dataset()
    return torch.utils.data.DataLoader(
        rows, batch_size=4, collate_fn=lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}
    )


def _trainer(tmp, **kw):
    return L.Trainer(
        max_steps=kw.pop("max_steps", 3),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp,
        **kw,
    )


@pytest.mark.parametrize("how", ["strategy", "callback"])
def test_lightning_exception_inside_a_step_leaves_weights_intact_and_unbinds(tmp_path, how):
    module = Module(fail_at=4)  # the -eps call of step 1
    ref = Module()
    _trainer(tmp_path / "ref", strategy=ZOStrategy(eps=1e-3), max_steps=1).fit(ref, _loader())
    if how == "strategy":
        trainer = _trainer(tmp_path / "run", strategy=ZOStrategy(eps=1e-3))
    else:
        trainer = _trainer(tmp_path / "run", callbacks=[ZOLightningCallback(eps=1e-3)])
    with pytest.raises(Boom):
        trainer.fit(module, _loader())
    assert_bit_identical(params_snapshot(ref.model), params_snapshot(module.model))
    if how == "callback":  # teardown does not run after an exception: on_exception unbinds
        assert "training_step" not in trainer.strategy.__dict__
        assert "zo_driver" not in trainer.strategy.__dict__
    else:
        assert trainer.strategy.zo_driver.outstanding == 0 and not trainer.strategy.zo_driver.has_estimates


def test_lightning_keyboard_interrupt_inside_a_step_leaves_weights_intact(tmp_path):
    module = Module(fail_at=2, exc=KeyboardInterrupt)  # the -eps call of step 0
    before = params_snapshot(module.model)
    trainer = _trainer(tmp_path, strategy=ZOStrategy(eps=1e-3))
    with pytest.raises(SystemExit):  # Lightning turns Ctrl-C into a graceful shutdown and exit(1)
        trainer.fit(module, _loader())
    assert_bit_identical(before, params_snapshot(module.model))
