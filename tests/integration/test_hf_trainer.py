"""ZOCallback in the STOCK transformers.Trainer: GA equivalence, bit-exact resume, per-group
lr/decay, logs, evaluation with the real forward, the fallback for what a callback cannot serve."""

import pytest
import torch
from transformers import Trainer, TrainerCallback
from zo_testing import VOCAB, args_for, assert_bit_identical, lm_dataset, params_snapshot, tiny_hf_model

from zo_plugins import ZOCallback, ZOTrainer
from zo_plugins.core.optimizer import materialize_direction


def test_trains_logs_and_restores_forward(tmp_path):
    model = tiny_hf_model("opt", dropout=0.1)
    before = params_snapshot(model)
    cb = ZOCallback(eps=1e-3)
    trainer = Trainer(model=model, args=args_for(tmp_path), train_dataset=lm_dataset(), callbacks=[cb])
    trainer.train()
    after = params_snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters()), "no parameter .grad may be allocated"
    assert "forward" not in model.__dict__, "the original forward must be restored"
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    for h in logs:
        assert {"projected_grad", "loss_plus", "loss_minus", "zo_skipped_steps"} <= h.keys()
        # the loss the Trainer logs is the mean of the two probed losses
        assert h["loss"] == pytest.approx((h["loss_plus"] + h["loss_minus"]) / 2, rel=1e-5)
    assert cb.optimizer.last_step.step == 3


def test_update_uses_trainer_lr_and_weight_decay_groups(tmp_path):
    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    cb = ZOCallback(eps=1e-3)
    args = args_for(tmp_path, max_steps=1, learning_rate=0.05, weight_decay=0.5)
    Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb]).train()
    g = cb.optimizer.last_step.projected_grad
    decayed = 0
    for name, p in model.named_parameters():
        # the Trainer's own grouping: no decay for biases and LayerNorm weights
        wd = 0.0 if ("bias" in name or "layer_norm" in name) else 0.5
        decayed += wd > 0
        z = materialize_direction(cb.optimizer, p, step=0)
        expected = before[name] - 0.05 * (g * z + wd * before[name])
        torch.testing.assert_close(p.detach(), expected, rtol=1e-5, atol=1e-6, msg=name)
    assert decayed > 0


def test_scheduler_drives_the_zo_learning_rate(tmp_path):
    model = tiny_hf_model("opt")
    cb = ZOCallback()
    args = args_for(tmp_path, max_steps=4, lr_scheduler_type="linear", learning_rate=1e-3)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb])
    trainer.train()
    # linear decay to 0 over 4 steps: the last update used lr = 1e-3 * 1/4
    assert cb.optimizer.param_groups[0]["lr"] == pytest.approx(0.25e-3)


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    results = []
    for bs, ga in ((8, 1), (2, 4)):
        model = tiny_hf_model("opt")
        args = args_for(
            tmp_path / f"{bs}", per_device_train_batch_size=bs, gradient_accumulation_steps=ga, max_steps=3
        )
        cb = ZOCallback(eps=1e-3)
        Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb]).train()
        results.append((params_snapshot(model), cb.optimizer.last_step.projected_grad))
    (a, ga), (b, gb) = results
    start = params_snapshot(tiny_hf_model("opt"))
    # the losses are float32 sums taken in another order: ~2.5e-7 of rounding over 2*eps
    assert ga == pytest.approx(gb, rel=5e-4)
    da = torch.cat([(a[n] - start[n]).reshape(-1) for n in a])
    db = torch.cat([(b[n] - start[n]).reshape(-1) for n in a])
    assert da.norm() > 0
    assert ((da - db).norm() / da.norm()).item() < 1e-3


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    class StopAt(TrainerCallback):  # an interruption right after checkpoint-3 was written
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 3:
                control.should_training_stop = True

    def run(out, resume=None, stop=False):
        model = tiny_hf_model("opt", dropout=0.1)
        args = args_for(out, max_steps=6, save_strategy="steps", save_steps=3, lr_scheduler_type="linear")
        callbacks = [ZOCallback(seed=5)] + ([StopAt()] if stop else [])
        trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return params_snapshot(model)

    full = run(tmp_path / "full")
    interrupted = run(tmp_path / "part", stop=True)
    assert any(not torch.equal(full[n], interrupted[n]) for n in full)
    resumed = run(tmp_path / "part", resume=str(tmp_path / "part" / "out" / "checkpoint-3"))
    assert_bit_identical(full, resumed)


def test_evaluation_and_generation_use_the_real_forward(tmp_path):
    model = tiny_hf_model("gpt2")
    data = lm_dataset(16)
    seen = {}

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kw):
            assert getattr(model.__dict__.get("forward"), "__zo_wrapper__", False)
            was = model.training
            model.eval()
            with torch.no_grad():
                ids = data[0]["input_ids"][None, :4]
                seen["gen"] = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
                out = model(input_ids=ids)
                ref = type(model).forward(model, input_ids=ids)
                seen["same"] = torch.equal(out.logits, ref.logits)
            model.train(was)

    trainer = Trainer(
        model=model,
        args=args_for(tmp_path, max_steps=1, eval_strategy="steps", eval_steps=1),
        train_dataset=data,
        eval_dataset=data[:8],
        callbacks=[ZOCallback(), Probe()],
    )
    trainer.train()  # evaluates after step 1, with the ZO wrapper installed
    assert seen["same"] and seen["gen"].shape == (1, 7)
    during = next(h["eval_loss"] for h in trainer.state.log_history if "eval_loss" in h)
    plain = Trainer(model=model, args=args_for(tmp_path / "plain"), eval_dataset=data[:8]).evaluate()
    assert during == pytest.approx(plain["eval_loss"], rel=1e-6)


def test_label_smoothing_is_refused_with_the_fallback_named(tmp_path):
    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    trainer = Trainer(
        model=model,
        args=args_for(tmp_path, label_smoothing_factor=0.1),
        train_dataset=lm_dataset(),
        callbacks=[ZOCallback()],
    )
    with pytest.raises(ValueError, match="ZOTrainer"):
        trainer.train()
    assert_bit_identical(before, params_snapshot(model))


def test_compute_loss_func_is_refused_with_the_fallback_named(tmp_path):
    model = tiny_hf_model("opt")
    before = params_snapshot(model)

    def loss_func(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1]
        return torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
        )

    trainer = Trainer(
        model=model,
        args=args_for(tmp_path),
        train_dataset=lm_dataset(),
        callbacks=[ZOCallback()],
        compute_loss_func=loss_func,
    )
    with pytest.raises(RuntimeError, match="ZOTrainer"):
        trainer.train()
    assert_bit_identical(before, params_snapshot(model))


@pytest.mark.parametrize("setting", ["label_smoothing", "compute_loss_func"])
def test_zo_trainer_serves_the_fallback(tmp_path, setting):
    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    kw = {}
    args = args_for(tmp_path, label_smoothing_factor=0.1 if setting == "label_smoothing" else 0.0)
    if setting == "compute_loss_func":
        kw["compute_loss_func"] = lambda outputs, labels, num_items_in_batch=None: (
            torch.nn.functional.cross_entropy(
                outputs.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1)
            )
        )
    trainer = ZOTrainer(model=model, args=args, train_dataset=lm_dataset(), zo_config={"eps": 1e-3}, **kw)
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(abs(h["projected_grad"]) > 0 for h in logs)


def test_bf16_autocast_and_half_precision_weights(tmp_path):
    # bf16 autocast over float32 weights
    model = tiny_hf_model("llama")
    Trainer(
        model=model,
        args=args_for(tmp_path / "a", bf16=True),
        train_dataset=lm_dataset(),
        callbacks=[ZOCallback()],
    ).train()
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in model.parameters())
    assert "forward" not in model.__dict__ or not getattr(model.__dict__["forward"], "__zo_wrapper__", False)
    # bf16 weights: with lr = 0 they come back bit-identical
    model = tiny_hf_model("llama", dtype=torch.bfloat16)
    before = params_snapshot(model)
    Trainer(
        model=model,
        args=args_for(tmp_path / "b", learning_rate=0.0),
        train_dataset=lm_dataset(),
        callbacks=[ZOCallback()],
    ).train()
    assert_bit_identical(before, params_snapshot(model))


def test_torch_compile(tmp_path):
    model = tiny_hf_model("gpt2")
    before = params_snapshot(model)
    args = args_for(tmp_path, torch_compile=True, torch_compile_backend="eager", max_steps=2)
    trainer = Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[ZOCallback()])
    trainer.train()
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(abs(h["projected_grad"]) > 0 for h in trainer.state.log_history if "loss" in h)


def test_grad_norm_reports_the_zo_gradient_estimate_not_zero(tmp_path):
    model = tiny_hf_model("opt")
    cb = ZOCallback(eps=1e-3, distribution="rademacher")
    trainer = Trainer(
        model=model, args=args_for(tmp_path, max_steps=2), train_dataset=lm_dataset(), callbacks=[cb]
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    dims = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for h in logs:
        # one Rademacher direction: |d| = |g| * sqrt(D) exactly (the stock log said 0.0)
        assert h["grad_norm"] == pytest.approx(abs(h["projected_grad"]) * dims**0.5, rel=1e-6)
        assert h["grad_norm"] > 0


def test_a_ranking_oracle_ranks_generated_text_through_the_callback(tmp_path):
    """objective returns text (here: greedy continuations) and the oracle ranks it; nothing
    converts the outputs to numbers, and the update follows the ranking."""
    model = tiny_hf_model("gpt2")
    seen = []

    def generate(model, batch):
        model.eval()
        try:
            with torch.no_grad():
                out = model.generate(
                    batch["input_ids"][:1, :4], max_new_tokens=3, do_sample=False, pad_token_id=0
                )
        finally:
            model.train()
        return " ".join(map(str, out[0, 4:].tolist()))  # "text"

    def oracle(texts):
        seen.append(list(texts))
        return sorted(range(len(texts)), key=lambda j: (sum(map(int, texts[j].split())), j))

    before = params_snapshot(model)
    cb = ZOCallback(generate, estimator="rank", n_queries=3, eps=1e-2, ranking_oracle=oracle)
    trainer = Trainer(
        model=model, args=args_for(tmp_path, max_steps=2), train_dataset=lm_dataset(), callbacks=[cb]
    )
    trainer.train()
    assert len(seen) == 2 and all(isinstance(t, str) for t in seen[0]) and len(seen[0]) == 3
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert cb.last_estimate.outputs == seen[-1]
