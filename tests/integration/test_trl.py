"""TRL's SFTTrainer: the callback alone refuses it (naming ZOSFTTrainer) before any weight
changes; ZOSFTTrainer trains the full model and a peft LoRA adapter, evaluates TRL's own loss
at the perturbed weights -- its fused LM head reads ``lm_head.weight`` outside the module,
and sees the perturbed values -- counts tokens once per micro-batch, and resumes bit for bit."""

from __future__ import annotations

import pytest
import torch
from transformers import TrainerCallback
from zo_testing import assert_bit_identical, params_snapshot, tiny_hf_model

trl = pytest.importorskip("trl", reason="trl is not installed: pip install 'zo-plugins[trl]'")
datasets = pytest.importorskip("datasets")

from zo_plugins import ZOCallback, ZOSFTTrainer  # noqa: E402
from zo_plugins.core.optimizer import materialize_direction  # noqa: E402


def tokenizer():
    from zo_testing import tiny_word_tokenizer

    return tiny_word_tokenizer()


def dataset(n=32):
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 60, (10,), generator=g).tolist()} for _ in range(n)]
    return datasets.Dataset.from_list(rows)


def sft_args(tmp, **kw):
    base = dict(
        output_dir=str(tmp),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        use_cpu=True,
        bf16=False,  # TRL's default bf16=True needs a GPU, or use_cpu=True with CPU bf16
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    base.update(kw)
    return trl.SFTConfig(**base)


def test_sft_trainer_with_the_callback_alone_is_refused_before_any_weight_changes(tmp_path):
    model = tiny_hf_model("llama")
    before = params_snapshot(model)
    trainer = trl.SFTTrainer(
        model=model,
        args=sft_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        callbacks=[ZOCallback()],
    )
    with pytest.raises(ValueError, match="Use zo_plugins.ZOSFTTrainer in place of trl.SFTTrainer"):
        trainer.train()
    assert_bit_identical(before, params_snapshot(model))
    assert not getattr(model.__dict__.get("forward"), "__zo_wrapper__", False)


def test_zo_sft_trainer_probes_trl_loss_at_the_perturbed_weights(tmp_path):
    """With lr=0 the weights stay at theta; TRL's own loss, evaluated with the weights moved to
    theta + eps z in place by hand, must equal what ZO measured for L+ (its fused head reads
    lm_head.weight directly, which the tied Llama shares with the embedding)."""
    model = tiny_hf_model("llama")  # tied embeddings
    seen = []
    trainer = ZOSFTTrainer(
        model=model,
        args=sft_args(tmp_path, max_steps=1, learning_rate=0.0),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        zo_config={"eps": 1e-3, "seed": 2},
    )
    real = trl.SFTTrainer.compute_loss

    def recording(self, model, inputs, *a, **kw):
        seen.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return real(self, model, inputs, *a, **kw)

    trl.SFTTrainer.compute_loss = recording
    try:
        trainer.train()
    finally:
        trl.SFTTrainer.compute_loss = real
    cb = trainer._zo_callback()
    opt, est = cb.optimizer, cb.last_estimate
    names = [s.name for s in opt.specs() if id(s.param) in opt.perturber.eager]
    assert names == ["model.embed_tokens.weight"], "the fused head's read of the tied weight was found"
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1e-3 * materialize_direction(opt, p, step=0))
        model.train()
        expected = real(trainer, model, dict(seen[0])).item()
    assert est.losses_plus[0] == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert est.calls == 2 and len(seen) == 2


def test_zo_sft_trainer_trains_full_and_counts_tokens_once(tmp_path):
    model = tiny_hf_model("llama")
    before = params_snapshot(model)
    trainer = ZOSFTTrainer(
        model=model,
        args=sft_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        zo_config={"eps": 1e-3},
    )
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 3 and all(abs(h["projected_grad"]) > 0 for h in logs)
    # 4 rows of 10 tokens per step: TRL's counter advances once per micro-batch, not per forward
    assert [h["num_tokens"] for h in logs] == [40.0, 80.0, 120.0]


def test_zo_sft_trainer_with_a_lora_adapter_trains_only_the_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    model = tiny_hf_model("llama")
    trainer = ZOSFTTrainer(
        model=model,
        args=sft_args(tmp_path),
        train_dataset=dataset(),
        processing_class=tokenizer(),
        peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        zo_config={"eps": 1e-2},
    )
    wrapped = trainer.model
    before = params_snapshot(wrapped)
    trainer.train()
    after = params_snapshot(wrapped)
    moved = {n for n in before if not torch.equal(before[n], after[n])}
    assert moved and all("lora_" in n for n in moved), sorted(moved)[:3]
    names = {s.name for s in trainer._zo_callback().optimizer.specs()}
    assert names and all("lora_" in n for n in names)


def test_zo_sft_trainer_resumes_bit_exactly(tmp_path):
    class StopAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                control.should_training_stop = True

    def run(out, resume=None, stop=False):
        model = tiny_hf_model("llama")
        args = sft_args(out, max_steps=4, save_strategy="steps", save_steps=2)
        trainer = ZOSFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset(),
            processing_class=tokenizer(),
            callbacks=[StopAt()] if stop else None,
            zo_config={"eps": 1e-3, "optimizer": "zo-adam"},
        )
        trainer.train(resume_from_checkpoint=resume)
        return params_snapshot(model)

    full = run(tmp_path / "full")
    run(tmp_path / "part", stop=True)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "checkpoint-2"))
    assert_bit_identical(full, resumed)
