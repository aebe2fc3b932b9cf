"""The convergence benchmark's cached top-blocks path is the full model, only cheaper.

``benchmarks/convergence.py --cached --trainable lora|full`` trains the last K decoder layers on
their cached inputs.  Its numbers mean something only if that is exactly the full model's
training: the same evaluation, the same loss, the same ZO steps.  Checked here on a tiny Llama
(4 layers, K = 2) with the example's own collator, objective and evaluation."""

from __future__ import annotations

import importlib.util
import pathlib
import sys

import pytest
import torch
import transformers as tf

from zo_plugins import ZOOptimizer

ROOT = pathlib.Path(__file__).resolve().parents[2]
LABELS = [5, 7]  # the two "label words"


def _load(name: str, path: pathlib.Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def conv():
    return _load("convergence_bench", ROOT / "benchmarks" / "convergence.py")


@pytest.fixture(scope="module")
def ex(conv):
    return conv.load_example()


class _Prompts(torch.utils.data.Dataset):
    """``PromptDataset``'s shape: ``items = [(ids ending in the label word, class)]``."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.items = []
        for _ in range(n):
            y = int(torch.randint(0, 2, (1,), generator=g))
            length = int(torch.randint(3, 12, (1,), generator=g))
            ids = torch.randint(10, 64, (length,), generator=g).tolist()
            self.items.append((ids + [LABELS[y]], y))

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        ids, y = self.items[i]
        return {"input_ids": ids, "label": y}


def _model():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=0,
    )
    return tf.LlamaForCausalLM(cfg)


def _setup(conv, ex, trainable):
    model = conv.select_top_blocks(_model(), trainable, 2, lora_rank=4)
    collate = ex.make_collator(0)
    train, evals = _Prompts(24, 1), _Prompts(20, 2)
    states = [conv.cache_block_inputs(model, ds, collate, 8, 2) for ds in (train, evals)]
    sets = [
        conv.StateDataset(st, [y for _, y in ds.items], [ids[-1] for ids, _ in ds.items])
        for st, ds in zip(states, (train, evals))
    ]
    task = conv.TopBlocksTask(model, 2, sets[0], sets[1], LABELS, 8)
    return model, task, collate, train, evals


def _full_eval(ex, task, model, evals, collate):
    with task.whole_model():
        return ex.evaluate(model, evals, collate, LABELS, 8)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_trainable_set_is_the_last_blocks(conv, trainable):
    model = conv.select_top_blocks(_model(), trainable, 2, lora_rank=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names
    for n in names:
        assert ".layers.2." in n or ".layers.3." in n or n.endswith("model.norm.weight"), n
    if trainable == "lora":
        assert all("lora_" in n for n in names) and len(names) == 2 * 2 * 2  # 2 layers x q,v x A,B
    else:
        assert any(n.endswith("model.norm.weight") for n in names)
        assert not any("embed_tokens" in n for n in names)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_cached_evaluation_and_loss_equal_the_full_model(conv, ex, trainable):
    model, task, collate, train, evals = _setup(conv, ex, trainable)
    # move the trainable weights off their initialisation (LoRA's B starts at zero): the check
    # must hold for whatever training makes of them
    with torch.no_grad():
        g = torch.Generator().manual_seed(3)
        for p in task.trainable:
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        task.initial = [p.detach().clone() for p in task.trainable]
    task.fresh()
    cached, full = task.evaluate(), _full_eval(ex, task, model, evals, collate)
    assert cached["accuracy"] == full["accuracy"]
    assert cached["predicted_positive"] == full["predicted_positive"]
    assert cached["loss"] == pytest.approx(full["loss"], rel=1e-5)

    idx = torch.tensor([3, 0, 17, 9, 4])
    with torch.no_grad():
        cached_loss = float(task.closure(idx)())
        with task.whole_model():
            real_loss = float(ex.label_word_objective(LABELS)(model, collate([train[int(i)] for i in idx])))
    assert cached_loss == pytest.approx(real_loss, rel=1e-5)


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_zo_steps_on_the_cut_model_equal_steps_on_the_full_model(conv, ex, trainable):
    """Same seed, same batches: the optimizer sees the same tensors in the same order, so the
    cut model's run and a run of the whole model end at the same weights (to float rounding of
    the losses), and the frozen layers below are untouched."""
    model, task, collate, train, _ = _setup(conv, ex, trainable)
    below = {
        n: p.detach().clone() for n, p in model.named_parameters() if ".layers.0." in n or ".layers.1." in n
    }
    batches = [torch.tensor([0, 1, 2, 3]), torch.tensor([4, 5, 6, 7]), torch.tensor([8, 9, 10, 11])]

    task.fresh()
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-3, seed=11)
    for idx in batches:
        opt.step(task.closure(idx))
    cut = [p.detach().clone() for p in task.trainable]

    task.fresh()
    objective = ex.label_word_objective(LABELS)
    with task.whole_model():
        opt = ZOOptimizer(model, lr=1e-2, eps=1e-3, seed=11)
        for idx in batches:
            batch = collate([train[int(i)] for i in idx])
            opt.step(lambda: objective(model, batch))
    whole = [p.detach().clone() for p in task.trainable]

    moved = max(float((a - b).abs().max()) for a, b in zip(cut, task.initial))
    assert moved > 1e-4  # the steps did something
    for a, b in zip(cut, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    for n, p in model.named_parameters():
        if n in below:
            assert torch.equal(p, below[n]), n
