"""The one-visit schedule and block offloading.

* Both perturbed forwards in one pass over the model (each block running its forward twice,
  once per half of a doubled batch) give the per-forward schedule's weights bit for bit, for
  every model family with an nn.ModuleList of blocks, with dropout on.
* Offloaded to CPU memory or to memory-mapped files on disk, with each block's update applied
  when it next arrives, the weights are bit-identical too; the files stay valid safetensors
  files holding the current weights, and a block's pages are let go after its visit.
* From the HF Trainer (gradient accumulation, checkpoint and resume, replay) and Lightning.
"""

from __future__ import annotations

import logging
import os
import re
import warnings

import pytest
import torch
from transformers import Trainer, TrainerCallback
from zo_testing import (
    VOCAB,
    args_for,
    assert_bit_identical,
    lm_dataset,
    params_snapshot,
    tiny_batch,
    tiny_hf_model,
)

from zo_plugins import ZOCallback, ZOOptimizer, replay
from zo_plugins.core.offload import find_blocks

warnings.filterwarnings("ignore", ".*does not have many workers.*")


def tiny(kind: str, dropout: float = 0.0):
    """The families of issue 12 (tiny_hf_model covers OPT, Llama, GPT-2)."""
    import transformers as tf

    if kind in ("opt", "llama", "gpt2"):
        return tiny_hf_model(kind, dropout=dropout)
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    if kind == "mistral":
        return tf.MistralForCausalLM(
            tf.MistralConfig(**common, num_key_value_heads=1, attention_dropout=dropout)
        )
    if kind == "qwen2":
        return tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, num_key_value_heads=1, attention_dropout=dropout))
    if kind == "phi":
        return tf.PhiForCausalLM(
            tf.PhiConfig(**common, resid_pdrop=dropout, embd_pdrop=dropout, attention_dropout=dropout)
        )
    raise ValueError(kind)


def run(kind, steps=3, dropout=0.1, **kw):
    m = tiny(kind, dropout)
    m.train()
    b = tiny_batch("llama")
    opt = ZOOptimizer(m, lr=1e-2, eps=1e-3, seed=1, **kw)
    torch.manual_seed(5)  # dropout masks
    for _ in range(steps):
        opt.step(lambda: m(**b).loss)
    opt.flush()
    return m, opt


@pytest.mark.parametrize("kind", ["opt", "llama", "gpt2", "mistral", "qwen2", "phi"])
def test_one_visit_and_offload_equal_the_per_forward_schedule_bit_for_bit(tmp_path, kind):
    ref, ref_opt = run(kind, schedule="per-forward")
    for kw in (
        dict(schedule="one-visit"),
        dict(offload="cpu"),
        dict(offload="disk", offload_dir=str(tmp_path / kind)),
    ):
        m, opt = run(kind, **kw)
        assert opt.schedule == "one-visit" and not opt.perturber.dual_off, kw
        assert_bit_identical(params_snapshot(ref), params_snapshot(m))
        assert opt.last_step.projected_grads == ref_opt.last_step.projected_grads


def test_one_visit_runs_each_block_once_per_step_and_generates_each_direction_twice(monkeypatch):
    from zo_plugins.core import noise

    calls = {"forward": 0, "fill": 0}
    m = tiny("llama")
    block = find_blocks(m)[1][0]
    block.register_forward_pre_hook(lambda *a: calls.__setitem__("forward", calls["forward"] + 1))
    real = noise.fill_direction_

    def counting(out, **kw):
        if kw.get("key") == opt.specs()[3].key:  # one tensor of block 0
            calls["fill"] += 1
        return real(out, **kw)

    opt = ZOOptimizer(m, lr=1e-2, schedule="one-visit")
    monkeypatch.setattr("zo_plugins.core.passes.fill_direction_", counting)
    b = tiny_batch("llama")
    opt.step(lambda: m(**b).loss)
    assert calls["forward"] == 1, "both perturbed forwards ran on the block in one visit"
    assert calls["fill"] == 2, "one generation for the +/- pair, one for the update (three per step before)"


def _mapped_rss_kib(paths: list[str]) -> int:
    total, current = 0, None
    with open("/proc/self/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                current = line.split()[-1] if len(line.split()) >= 6 else None
            elif line.startswith("Rss:") and current in paths:
                total += int(line.split()[1])
    return total


def test_disk_offload_files_hold_the_weights_and_pages_are_let_go(tmp_path):
    from safetensors import safe_open

    m, opt = run("llama", offload="disk", offload_dir=str(tmp_path))
    files = sorted(str(p) for p in tmp_path.glob("block-*.safetensors"))
    assert len(files) == 2
    assert _mapped_rss_kib(files) == 0, "after a visit the block's pages are dropped from the process"
    blocks = find_blocks(m)[1]
    for path, block in zip(files, blocks):
        named = [p for mod in block.modules() for p in mod._parameters.values() if p is not None]
        with safe_open(path, framework="pt") as f:
            for j, p in enumerate(named):
                assert torch.equal(f.get_tensor(str(j)), p.detach()), (path, j)
    b = tiny_batch("llama")
    with torch.no_grad():
        m(**b)
    assert _mapped_rss_kib(files) == 0
    assert opt.offload.visits > 0 and opt.offload.bytes_in >= sum(tmp_path.stat().st_size for _ in [0])


def test_the_first_step_reads_each_block_once_and_leaves_no_page_resident(tmp_path):
    """The first step's weight norm (the learning-rate warning) is taken block by block on the
    visits: reading the offloaded tensors after the forwards would read every block file a
    second time and leave its pages resident (measured: 10 GiB of a 27-GB model's pages)."""
    ref, ref_opt = run("llama", steps=1, schedule="per-forward")
    m = tiny("llama", 0.1)
    m.train()
    b = tiny_batch("llama")
    opt = ZOOptimizer(m, lr=1e-2, eps=1e-3, seed=1, offload="disk", offload_dir=str(tmp_path))
    torch.manual_seed(5)
    opt.step(lambda: m(**b).loss)  # no flush: the step as the next one will find it
    files = sorted(str(p) for p in tmp_path.glob("block-*.safetensors"))
    assert _mapped_rss_kib(files) == 0
    assert opt.offload.visits == len(files) and opt.offload.bytes_in == sum(os.path.getsize(f) for f in files)
    assert opt._watch.weight_norm == pytest.approx(ref_opt._watch.weight_norm, rel=1e-12)
    assert opt.offload.sumsq is None  # measured once


def test_a_fallback_in_the_middle_of_the_doubled_forward_keeps_offload_exact(tmp_path, caplog):
    """A model whose forward cannot run on the doubled batch (here a hook on the first block
    indexes a tensor of the batch's size; TRL's SFTTrainer did the same) fails the one-visit
    pass after some blocks arrived; the step falls back to one forward per perturbation. The
    blocks' arrivals during that first watched forward (their weight norm, later their pending
    update) are the offload's own reads: no block tensor may be taken for one the model reads
    outside its module, or its perturbed copy would be made before its update arrives."""
    b = tiny_batch("llama")
    rows = torch.arange(b["input_ids"].shape[0])

    def build():
        m = tiny("llama", 0.0)
        first = find_blocks(m)[1][0]

        def batch_sized(mod, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rows[hidden.shape[0] - 1]  # IndexError on the doubled batch, before any block arrived

        first.register_forward_pre_hook(batch_sized, with_kwargs=True)
        return m

    def train(m, **kw):
        opt = ZOOptimizer(m, lr=1e-2, eps=1e-3, seed=1, **kw)
        for _ in range(3):
            opt.step(lambda: m(**b).loss)
        opt.flush()
        return opt

    ref = build()
    train(ref, schedule="per-forward")
    m = build()
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        opt = train(m, offload="disk", offload_dir=str(tmp_path))
    assert "IndexError in the doubled forward" in caplog.text and opt.perturber.dual_off
    assert_bit_identical(params_snapshot(ref), params_snapshot(m))
    block_params = {id(p) for blk in find_blocks(m)[1] for p in blk.parameters()}
    assert not (opt.perturber.eager & block_params)


def _objective_runs(closure_of, **kw):
    m = tiny("opt", 0.0)
    b = tiny_batch("llama")
    opt = ZOOptimizer(m, lr=1e-2, eps=1e-3, seed=1, **kw)
    for _ in range(3):
        opt.step(closure_of(m, b))
    return m, opt


def test_a_loss_computed_from_the_outputs_runs_in_one_visit_too():
    """The closure's model call is answered twice: one pass over the model, then the closure
    computes its own loss (here from the logits) on each half's outputs."""

    def objective(m, b):
        return lambda: m(**b).logits.float().pow(2).mean()

    ref, _ = _objective_runs(objective)
    m, opt = _objective_runs(objective, schedule="one-visit")
    assert not opt.perturber.dual_off
    assert_bit_identical(params_snapshot(ref), params_snapshot(m))


def test_a_closure_the_schedule_cannot_serve_falls_back_with_the_reason(caplog):
    def fresh_inputs(m, b):  # a new input tensor for every call: the two calls cannot be paired
        return lambda: m(input_ids=b["input_ids"].clone()).logits.float().pow(2).mean()

    ref, _ = _objective_runs(fresh_inputs)
    with caplog.at_level(logging.WARNING, logger="zo_plugins"):
        m, opt = _objective_runs(fresh_inputs, schedule="one-visit")
    assert "one-visit schedule does not apply (the closure called the model with other inputs" in caplog.text
    assert opt.perturber.dual_off
    assert_bit_identical(params_snapshot(ref), params_snapshot(m))


def test_bad_offload_settings_are_refused_before_any_weight_changes(tmp_path):
    m = tiny("llama")
    before = params_snapshot(m)
    with pytest.raises(ValueError, match="offload='disk' needs offload_dir"):
        ZOOptimizer(m, lr=1e-3, offload="disk")
    with pytest.raises(ValueError, match="supports the linear update rules"):
        ZOOptimizer(m, lr=1e-3, offload="cpu", optimizer="zo-adam")
    with pytest.raises(ValueError, match="estimator='forward' evaluates other points"):
        ZOOptimizer(m, lr=1e-3, offload="cpu", estimator="forward")
    with pytest.raises(ValueError, match="perturbs out of place"):
        ZOOptimizer(m, lr=1e-3, schedule="one-visit", perturbation="in-place")
    mlp = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    with pytest.raises(ValueError, match="need the model's transformer blocks in an nn.ModuleList"):
        ZOOptimizer(mlp, lr=1e-3, offload="cpu")
    assert_bit_identical(before, params_snapshot(m))


# ----------------------------------------------------------------------------- HF Trainer
class _StopAt(TrainerCallback):
    def on_step_end(self, args, state, control, **kw):
        if state.global_step == 2:
            control.should_training_stop = True


def hf(tmp, *, stop=False, resume=None, **zo):
    model = tiny_hf_model("llama", dropout=0.1)
    args = args_for(
        tmp,
        max_steps=4,
        save_strategy="steps",
        save_steps=2,
        gradient_accumulation_steps=2,
        per_device_train_batch_size=2,
    )
    cb = ZOCallback(eps=1e-3, seed=4, **zo)
    trainer = Trainer(
        model=model, args=args, train_dataset=lm_dataset(), callbacks=[cb] + ([_StopAt()] if stop else [])
    )
    trainer.train(resume_from_checkpoint=resume)
    return model, cb


def test_hf_trainer_with_disk_offload_accumulates_resumes_and_replays(tmp_path):
    ref, _ = hf(tmp_path / "ref")
    full, cb = hf(
        tmp_path / "full",
        offload="disk",
        offload_dir=str(tmp_path / "blocks-full"),
        trajectory_path=str(tmp_path / "t.zot"),
    )
    assert cb.optimizer.schedule == "one-visit" and not cb.optimizer.perturber.dual_off
    assert_bit_identical(params_snapshot(ref), params_snapshot(full))
    hf(tmp_path / "part", stop=True, offload="disk", offload_dir=str(tmp_path / "blocks-part"))
    resumed, _ = hf(
        tmp_path / "part",
        resume=str(tmp_path / "part" / "out" / "checkpoint-2"),
        offload="disk",
        offload_dir=str(tmp_path / "blocks-resumed"),
    )
    assert_bit_identical(params_snapshot(full), params_snapshot(resumed))
    assert_bit_identical(
        params_snapshot(full),
        params_snapshot(replay(tiny_hf_model("llama", dropout=0.1), tmp_path / "t.zot")),
    )


def test_lightning_strategy_with_offload_equals_the_plain_optimizer(tmp_path):
    L = pytest.importorskip("lightning.pytorch")
    from zo_plugins.lightning import ZOStrategy

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = tiny_hf_model("opt")

        def training_step(self, batch, i):
            return self.model(**batch).loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-2)

    rows = [lm_dataset()[0]] * 32
    loader = torch.utils.data.DataLoader(
        rows, batch_size=4, collate_fn=lambda rs: {k: torch.stack([r[k] for r in rs]) for k in rs[0]}
    )
    module = Module()
    trainer = L.Trainer(
        strategy=ZOStrategy(eps=1e-3, offload="disk", offload_dir=str(tmp_path / "blocks")),
        max_steps=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, loader)
    ref = Module()
    opt = ZOOptimizer(ref, lr=1e-2, eps=1e-3)
    batch = {k: torch.stack([r[k] for r in rows[:4]]) for k in rows[0]}
    for _ in range(3):
        opt.step(lambda: ref.model(**batch).loss)
    assert_bit_identical(params_snapshot(ref), params_snapshot(module))
