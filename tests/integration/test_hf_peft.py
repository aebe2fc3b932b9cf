"""PEFT adapters through ZOCallback: only trainable tensors move, the frozen base stays
bit-identical, LoRA dropout sees the same masks in both forwards, adapters save, load and
replay from the trajectory log."""

import pytest
import torch
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig, get_peft_model
from transformers import Trainer
from zo_testing import args_for, lm_dataset, params_snapshot, tiny_hf_model

from zo_plugins import ZOCallback, ZOOptimizer, replay
from zo_plugins.core.optimizer import materialize_direction

ADAPTERS = {
    "lora": lambda: LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj"],
        lora_dropout=0.2,
        task_type="CAUSAL_LM",
        init_lora_weights=False,
    ),
    "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
    "prompt": lambda: PromptTuningConfig(num_virtual_tokens=4, task_type="CAUSAL_LM"),
}


def peft_model(kind, seed=0):
    base = tiny_hf_model("llama" if kind != "prefix" else "opt")
    torch.manual_seed(seed)
    return get_peft_model(base, ADAPTERS[kind]())


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_adapters_train_and_the_base_stays_bit_identical(tmp_path, kind):
    model = peft_model(kind)
    before = params_snapshot(model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and len(trainable) < len(before)
    log = tmp_path / "traj.zot"
    cb = ZOCallback(eps=1e-2, trajectory_path=str(log))
    Trainer(
        model=model,
        args=args_for(tmp_path, learning_rate=1e-2, max_steps=3),
        train_dataset=lm_dataset(),
        callbacks=[cb],
    ).train()
    after = params_snapshot(model)
    for n in before:
        same = torch.equal(before[n], after[n])
        assert same != (n in trainable), f"{n}: trainable={n in trainable} but unchanged={same}"
    assert {s.name for s in cb.optimizer.specs()} == trainable

    # the adapter saves and loads, and the trajectory rebuilds it from the initial adapter
    model.save_pretrained(tmp_path / "adapter")
    fresh = peft_model(kind)
    fresh.load_adapter(tmp_path / "adapter", adapter_name="default", is_trainable=True)
    for n in trainable:
        assert torch.equal(dict(fresh.named_parameters())[n], after[n])
    replayed = replay(peft_model(kind), log)
    for n in trainable:
        assert torch.equal(dict(replayed.named_parameters())[n], after[n]), n


def test_lora_dropout_sees_the_same_masks_in_both_forwards():
    model = peft_model("lora").double()
    model.train()
    ids = torch.randint(2, 64, (4, 10), generator=torch.Generator().manual_seed(0))

    def loss_fn():
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    opt = ZOOptimizer(model, lr=0.0, eps=1e-4)
    rng = torch.get_rng_state()
    est = opt.estimate(loss_fn)
    opt.restore()
    torch.set_rng_state(rng)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), params)
    expected = sum(
        (g * materialize_direction(opt, p, step=0).double()).sum() for g, p in zip(grads, params)
    ).item()
    # Llama's RMSNorm computes in float32, so the match is to ~1e-4 (see test_hf_models)
    assert est.projected_grads[0] == pytest.approx(expected, rel=1e-3)


def test_forward_grad_on_a_lora_model_is_autograds_directional_derivative():
    model = peft_model("lora").double()
    model.eval()  # forward-mode AD with LoRA dropout off: the exact derivative of one function
    ids = torch.randint(2, 64, (4, 10), generator=torch.Generator().manual_seed(0))

    def loss_fn():
        logits = model(input_ids=ids).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1))

    before = params_snapshot(model)
    opt = ZOOptimizer(model, lr=0.0, estimator="forward-grad", n_queries=2)
    est = opt.estimate(loss_fn)
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss_fn(), params)
    for q in range(2):
        expected = sum(
            (g * materialize_direction(opt, p, step=0, query=q).double()).sum() for g, p in zip(grads, params)
        ).item()
        assert est.projected_grads[q] == pytest.approx(expected, rel=1e-4)
    after = params_snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)
