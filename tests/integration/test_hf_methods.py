"""Every estimator, update rule, sparsity mode and block-wise descent runs from the stock HF
Trainer through ZOCallback unchanged, and its trajectory replays to the same bits."""

import pytest
import torch
from transformers import Trainer
from zo_testing import args_for, assert_bit_identical, lm_dataset, params_snapshot, tiny_hf_model

from zo_plugins import ZOCallback, replay

VARIANTS = [
    {"estimator": "spsa"},
    {"estimator": "forward", "n_queries": 2},
    {"estimator": "forward-grad"},
    {"estimator": "cge", "cge_coordinates": 4},
    {"estimator": "rank", "n_queries": 3},
    {"optimizer": "zo-sgd-momentum"},
    {"optimizer": "zo-sgd-momentum", "momentum_history": 2},
    {"optimizer": "zo-sgd-sign"},
    {"optimizer": "zo-sgd-conservative"},
    {"optimizer": "zo-adam"},
    {"sparsity": 0.75, "sparsity_mode": "magnitude"},
    {"sparsity": 0.75, "sparsity_mode": "random"},
    {"block_wise": "cycle"},
    {"distribution": "sphere", "n_queries": 2, "sparsity": 0.5, "sparsity_mode": "random"},
    {"gaussian_stream": "philox", "optimizer": "zo-adam"},
]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()))
def test_variant_trains_through_the_callback_and_replays(tmp_path, variant):
    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    log = tmp_path / "t.zot"
    cb = ZOCallback(eps=1e-3, trajectory_path=str(log), **variant)
    args = args_for(tmp_path, max_steps=3, gradient_accumulation_steps=2, learning_rate=1e-3)
    Trainer(model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb]).train()
    after = params_snapshot(model)
    assert any(not torch.equal(before[n], after[n]) for n in before), "weights must move"
    assert all(p.grad is None for p in model.parameters())
    replayed = replay(tiny_hf_model("opt"), log)
    assert_bit_identical(after, params_snapshot(replayed))


def test_non_differentiable_objective_is_maximised(tmp_path):
    """Token accuracy (argmax, no gradient exists) as the objective."""
    model = tiny_hf_model("opt")
    seen = {}

    def accuracy(m, batch):
        seen["keys"] = sorted(batch)
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        return (logits[:, :-1].argmax(-1) == batch["labels"][:, 1:]).float().mean()

    cb = ZOCallback(objective=accuracy, maximize=True, eps=1e-2)
    trainer = Trainer(
        model=model,
        args=args_for(tmp_path, max_steps=2, learning_rate=1e-2),
        train_dataset=lm_dataset(),
        callbacks=[cb],
    )
    trainer.train()
    assert seen["keys"] == ["attention_mask", "input_ids", "labels"]
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert all(0.0 <= h["loss_plus"] <= 1.0 for h in logs), "the logged values are accuracies"
    with pytest.raises(ValueError, match="callable"):
        ZOCallback(objective="accuracy")
