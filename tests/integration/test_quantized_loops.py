"""Quantized ZO through the real loops: the HF Trainer (``ZOTrainer`` for a purely quantized
model, which the stock Trainer refuses; ``ZOCallback`` for a ZO QLoRA and for models quantized
after loading) and Lightning's ``ZOStrategy``: only the scales (or adapters) move, the codes
stay bit-identical, a resumed run equals an uninterrupted one bit for bit, and the trajectory
replays to the same scales."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from zo_testing import (
    args_for,
    frozen_state,
    lm_dataset,
    quant_available,
    tiny_hf_model,
    tiny_quantized_llama,
)

from zo_plugins import ZOCallback, ZOTrainer, replay
from zo_plugins.quant import scales_state_dict

tf = pytest.importorskip("transformers")

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(not quant_available(b), reason=f"{b} not installed"))
    for b in ("bnb-nf4", "torchao-int8")
]
EPS = {"bnb-nf4": 5e-4, "torchao-int8": 3e-6}  # ~1e-2 x the RMS of the scales
LR = {"bnb-nf4": 1e-2, "torchao-int8": 1e-6}


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} of {len(a)} tensors differ, e.g. {bad[:3]}"


def zo_trainer(model, tmp_path, backend, **args):
    return ZOTrainer(
        model=model,
        args=args_for(tmp_path, learning_rate=LR[backend], **args),
        train_dataset=lm_dataset(),
        zo_config={"eps": EPS[backend]},
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_zo_trainer_trains_the_scales_of_a_purely_quantized_model(tmp_path, backend):
    model = tiny_quantized_llama(backend)
    with pytest.raises(ValueError, match="purely quantized"):  # transformers' own check, in Trainer.__init__
        tf.Trainer(model=model, args=args_for(tmp_path), train_dataset=lm_dataset(), callbacks=[ZOCallback()])

    before, scales0 = frozen_state(model), scales_state_dict(model)
    log = tmp_path / "run.zot"
    trainer = ZOTrainer(
        model=model,
        args=args_for(tmp_path, learning_rate=LR[backend], max_steps=4, save_strategy="steps", save_steps=2),
        train_dataset=lm_dataset(),
        zo_config={"eps": EPS[backend], "trajectory_path": str(log)},
    )
    trainer.train()
    assert_same(frozen_state(model), before)  # codes, embedding, norms
    final = scales_state_dict(model)
    assert all(not torch.equal(scales0[n], final[n]) for n in scales0)
    assert {s.name for s in trainer._zo_callback().optimizer.specs()} == set(scales0)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))

    # resume from the step-2 checkpoint: the Trainer's own reload drops bitsandbytes' absmax
    # ("unexpected keys"); the scales ride in the ZO state and the run continues bit for bit
    resumed = tiny_quantized_llama(backend)
    zo_trainer(resumed, tmp_path, backend, max_steps=4, save_strategy="steps", save_steps=2).train(
        resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2")
    )
    assert_same(scales_state_dict(resumed), final)
    assert_same(scales_state_dict(replay(tiny_quantized_llama(backend), log)), final)


def tiny_qlora(peft):
    """LoRA r=2 on q_proj / v_proj (B not zero, so the adapters act from the first step) over
    a tiny NF4 Llama."""
    return peft.get_peft_model(
        tiny_quantized_llama("bnb-nf4"),
        peft.LoraConfig(
            r=2, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
        ),
    )


def test_zo_qlora_through_the_stock_trainer(tmp_path):
    """PEFT LoRA on a 4-bit base: the stock Trainer accepts it, ZOCallback trains the adapters
    only (quantized='auto' -> 'adapters'); codes and scales stay bit-identical."""
    peft = pytest.importorskip("peft")
    if not quant_available("bnb-nf4"):
        pytest.skip("bitsandbytes not installed")
    model = tiny_qlora(peft)
    lora = {f"param:{n}" for n, p in model.named_parameters() if p.requires_grad}
    before, scales = frozen_state(model), scales_state_dict(model)
    cb = ZOCallback(eps=1e-2)
    tf.Trainer(
        model=model,
        args=args_for(tmp_path, learning_rate=1e-2, max_steps=3),
        train_dataset=lm_dataset(),
        callbacks=[cb],
    ).train()
    after = frozen_state(model)
    assert {k for k in before if not torch.equal(before[k], after[k])} == lora
    assert_same(scales_state_dict(model), scales)


def test_zo_callback_trains_a_model_quantized_after_loading(tmp_path):
    """A model quantized with torchao's quantize_ (no transformers quantizer) passes the stock
    Trainer's checks: ZOCallback alone trains its scales."""
    if not quant_available("torchao-int8"):
        pytest.skip("torchao not installed")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model = tiny_hf_model("llama")
    quantize_(
        model,
        Int8WeightOnlyConfig(),
        filter_fn=lambda m, fqn: isinstance(m, torch.nn.Linear) and "lm_head" not in fqn,
    )
    model.train()
    before, scales0 = frozen_state(model), scales_state_dict(model)
    cb = ZOCallback(eps=3e-6)
    tf.Trainer(
        model=model,
        args=args_for(tmp_path, learning_rate=1e-6, max_steps=3),
        train_dataset=lm_dataset(),
        callbacks=[cb],
    ).train()
    assert_same(frozen_state(model), before)
    after = scales_state_dict(model)
    assert len(after) == 14 and all(not torch.equal(scales0[n], after[n]) for n in after)


# ---------------------------------------------------------------------------- Lightning
L = pytest.importorskip("lightning.pytorch")
warnings.filterwarnings("ignore", ".*does not have many workers.*")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)


class QuantizedLM(L.LightningModule):
    """A plain LightningModule over a quantized model; it knows nothing about ZO."""

    def __init__(self, backend: str) -> None:
        super().__init__()
        self.model = tiny_quantized_llama(backend)
        self.lr = LR[backend]
        self.strict_loading = False  # bitsandbytes' 4-bit state_dict does not load back strictly

    def training_step(self, batch, batch_idx):
        return self.model(**batch).loss

    def configure_optimizers(self):
        return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=self.lr)


def fit(module, backend, max_steps, ckpt_path=None, checkpoint_dir=None):
    from lightning.pytorch.callbacks import ModelCheckpoint

    from zo_plugins.lightning import ZOStrategy

    ckpt = [ModelCheckpoint(dirpath=checkpoint_dir, every_n_train_steps=2, save_top_k=-1, filename="{step}")]
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=checkpoint_dir is not None,
        callbacks=ckpt if checkpoint_dir is not None else None,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=ZOStrategy(eps=EPS[backend]),
    )
    loader = torch.utils.data.DataLoader(lm_dataset(n=8), batch_size=4)  # 2 steps an epoch
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("backend", BACKENDS)
def test_zo_strategy_trains_the_scales_and_resumes_bit_exactly(tmp_path, backend):
    full = QuantizedLM(backend)
    before, scales0 = frozen_state(full.model), scales_state_dict(full.model)
    fit(full, backend, 4, checkpoint_dir=tmp_path)
    assert_same(frozen_state(full.model), before)
    final = scales_state_dict(full.model)
    assert all(not torch.equal(scales0[n], final[n]) for n in final)
    saved = torch.load(tmp_path / "step=2.ckpt", weights_only=False)
    assert set(saved["zo_plugins"]["state"]["scales"]) == {f"model.{n}" for n in final}

    resumed = QuantizedLM(backend)
    fit(resumed, backend, 4, ckpt_path=tmp_path / "step=2.ckpt")
    assert_same(scales_state_dict(resumed.model), final)


# ---------------------------------------------------------------------------- QZO's clipping
@pytest.mark.parametrize("backend", BACKENDS)
def test_directional_derivative_clipping_is_counted_in_both_loops(tmp_path, backend):
    """QZO clips the directional derivative: that is ``clip_projected_grad``.  With a bound
    far below any estimate every step is clipped, the HF log and Lightning's logged metrics
    carry the count as ``zo_clipped_steps``, and the applied projected gradient is the bound."""
    from zo_plugins.lightning import ZOStrategy

    clip = 1e-9
    trainer = ZOTrainer(
        model=tiny_quantized_llama(backend),
        args=args_for(tmp_path, learning_rate=LR[backend], max_steps=3),
        train_dataset=lm_dataset(),
        zo_config={"eps": EPS[backend], "clip_projected_grad": clip},
    )
    trainer.train()
    logged = [h for h in trainer.state.log_history if "zo_clipped_steps" in h]
    assert [h["zo_clipped_steps"] for h in logged] == [1, 2, 3]
    assert all(abs(h["projected_grad"]) == pytest.approx(clip) for h in logged)

    module = QuantizedLM(backend)
    lt = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        strategy=ZOStrategy(eps=EPS[backend], clip_projected_grad=clip),
    )
    lt.fit(module, torch.utils.data.DataLoader(lm_dataset(n=12), batch_size=4))
    assert float(lt.logged_metrics["zo_clipped_steps"]) == 3.0
    assert abs(float(lt.logged_metrics["projected_grad"])) == pytest.approx(clip)


def test_zo_qlora_through_the_stock_trainer_resumes_bit_exactly(tmp_path):
    """ZO QLoRA (adapters on an NF4 base) through the stock Trainer + ZOCallback: a run resumed
    from its step-2 checkpoint ends with the uninterrupted run's adapters bit for bit."""
    peft = pytest.importorskip("peft")
    if not quant_available("bnb-nf4"):
        pytest.skip("bitsandbytes not installed")

    def run(resume=None):
        torch.manual_seed(0)
        model = tiny_qlora(peft)
        tf.Trainer(
            model=model,
            args=args_for(tmp_path, learning_rate=1e-2, max_steps=4, save_strategy="steps", save_steps=2),
            train_dataset=lm_dataset(),
            callbacks=[ZOCallback(eps=1e-2)],
        ).train(resume_from_checkpoint=resume)
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    full = run()
    resumed = run(str(tmp_path / "out" / "checkpoint-2"))
    assert full.keys() == resumed.keys() and len(full) > 0
    assert_same(full, resumed)
