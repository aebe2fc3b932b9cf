"""Quantized ZO on tiny quantized Llamas (torchao int8, bitsandbytes NF4 / FP4 + double
quantization / int8): the trainable set is the scales, the integer codes and every other
tensor stay bit-identical, the SPSA estimate is the finite difference of the loss in the
scales, training lowers the loss, resume and replay are bit-exact, and bad input is refused
before anything changes."""

from __future__ import annotations

import math

import pytest
import torch
from zo_testing import (
    QUANT_BACKENDS,
    frozen_state,
    quant_available,
    tiny_batch,
    tiny_hf_model,
    tiny_quantized_llama,
)

from zo_plugins import ZOConfig, ZOOptimizer, replay
from zo_plugins.core.optimizer import materialize_direction
from zo_plugins.quant import (
    describe,
    load_scales_state_dict,
    quantized_scales,
    resolve_quantized,
    scales_state_dict,
)

pytest.importorskip("transformers")

BACKENDS = [
    pytest.param(b, marks=pytest.mark.skipif(not quant_available(b), reason=f"{b} not installed"))
    for b in QUANT_BACKENDS
]
SUFFIX = {
    "torchao-int8": (".weight.scale",),
    "bnb-nf4": (".weight.absmax",),
    "bnb-fp4-double": (".weight.nested_absmax", ".weight.nested_offset"),
    "bnb-int8": (".SCB",),
}
LINEARS = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


def hyper(model) -> dict:
    """eps and lr in the units of the scales (they differ by back-end: docs/quantized.md)."""
    rms = next(iter(describe(model).values()))["rms"]
    return {"eps": 1e-2 * rms, "lr": 30 * rms * rms}


def loss_of(model, batch) -> float:
    with torch.no_grad():
        return float(model(**batch).loss)


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} of {len(a)} tensors changed, e.g. {bad[:3]}"


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_trainable_set_is_every_scale_with_stable_names(backend):
    model = tiny_quantized_llama(backend)
    scales = quantized_scales(model)
    expected = sorted(f"{m}{sfx}" for m in LINEARS for sfx in SUFFIX[backend])
    assert sorted(s.name for s in scales) == expected  # lm_head stays unquantized (tied embedding)
    for s in scales:
        assert s.tensor.is_floating_point()
        assert s.codes and all(not c.is_floating_point() for c in s.codes)
    opt = ZOOptimizer(model, lr=0.0, eps=1e-3)  # quantized='auto': a quantized model trains its scales
    assert [sp.name for sp in opt.specs()] == [s.name for s in scales]
    assert all(sp.carrier is not None for sp in opt.specs())
    assert opt.perturbation_mode == "out-of-place"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_step_with_lr_zero_leaves_everything_bit_identical(backend):
    model = tiny_quantized_llama(backend)
    batch = tiny_batch("llama")
    before, scales = frozen_state(model), scales_state_dict(model)
    opt = ZOOptimizer(model, **dict(hyper(model), lr=0.0))
    for _ in range(2):
        opt.step(lambda: model(**batch).loss)
    assert opt.last_step.projected_grad != 0.0  # the perturbation reached the loss
    assert_same(frozen_state(model), before)
    assert_same(scales_state_dict(model), scales)
    assert all(s.current() is s.tensor for s in quantized_scales(model)), (
        "the layers hold the trained tensors"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_estimate_is_the_finite_difference_in_the_scales(backend):
    """Handing each layer a perturbed copy (the carrier) computes what writing the scales
    in place computes: the projected gradient is (L(s + eps z) - L(s - eps z)) / 2 eps."""
    model = tiny_quantized_llama(backend)
    batch = tiny_batch("llama")
    h = hyper(model)
    opt = ZOOptimizer(model, lr=0.0, eps=h["eps"])
    est = opt.estimate(lambda: model(**batch).loss, step=0)
    scales = quantized_scales(model)
    z = {s.name: materialize_direction(opt, s.tensor, step=0) for s in scales}
    base = scales_state_dict(model)

    def at(sign: float) -> float:
        load_scales_state_dict(
            model, {n: (v.float() + sign * h["eps"] * z[n]).to(v.dtype) for n, v in base.items()}
        )
        return loss_of(model, batch)

    fd = (at(+1) - at(-1)) / (2 * h["eps"])
    load_scales_state_dict(model, base)
    assert est.projected_grads[0] == pytest.approx(fd, rel=1e-5, abs=1e-6)
    assert abs(fd) > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_changes_only_the_scales_and_lowers_the_loss(backend):
    model = tiny_quantized_llama(backend)
    batch = tiny_batch("llama")
    before, scales0, loss0 = frozen_state(model), scales_state_dict(model), loss_of(model, batch)
    h = hyper(model)
    opt = ZOOptimizer(model, distribution="rademacher", eps=h["eps"], lr=2 * h["lr"])
    for _ in range(8):
        opt.step(lambda: model(**batch).loss)
    assert_same(frozen_state(model), before)  # codes, embeddings, norms: untouched
    scales1 = scales_state_dict(model)
    assert all(not torch.equal(scales0[n], scales1[n]) for n in scales0), "every scale tensor moved"
    assert loss_of(model, batch) < loss0 - 2e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_and_replay_are_bit_exact(backend, tmp_path):
    batch = tiny_batch("llama")

    def run(model, opt, steps):
        for _ in range(steps):
            opt.step(lambda: model(**batch).loss)

    model = tiny_quantized_llama(backend)
    log = tmp_path / "run.zot"
    opt = ZOOptimizer(model, optimizer="zo-sgd-momentum", trajectory_path=log, **hyper(model))
    run(model, opt, 6)
    opt.close()
    full = scales_state_dict(model)

    first = tiny_quantized_llama(backend)
    opt = ZOOptimizer(first, optimizer="zo-sgd-momentum", **hyper(first))
    run(first, opt, 3)
    saved = {"opt": opt.state_dict(), "scales": scales_state_dict(first)}
    torch.save(saved, tmp_path / "ckpt.pt")
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = tiny_quantized_llama(backend)
    h = hyper(resumed)  # taken before loading, as at the start of the run
    load_scales_state_dict(resumed, saved["scales"])
    opt = ZOOptimizer(resumed, optimizer="zo-sgd-momentum", **h)
    opt.load_state_dict(saved["opt"])
    run(resumed, opt, 3)
    assert_same(scales_state_dict(resumed), full)

    replayed = replay(tiny_quantized_llama(backend), log)
    assert_same(scales_state_dict(replayed), full)


@pytest.mark.parametrize("backend", ["torchao-int8", "bnb-nf4"])
def test_a_forward_that_raises_leaves_the_layers_unperturbed(backend):
    if not quant_available(backend):
        pytest.skip(f"{backend} not installed")
    model = tiny_quantized_llama(backend)
    batch = tiny_batch("llama")
    opt = ZOOptimizer(model, **hyper(model))
    scales = scales_state_dict(model)
    calls = {"n": 0}

    def boom(mod, args, out):
        calls["n"] += 1
        if calls["n"] == 2:  # inside the second perturbed forward, after layer 0 ran on perturbed scales
            raise KeyboardInterrupt

    handle = model.model.layers[1].register_forward_hook(boom)
    with pytest.raises(KeyboardInterrupt):
        opt.step(lambda: model(**batch).loss)
    handle.remove()
    assert_same(scales_state_dict(model), scales)
    assert all(s.current() is s.tensor for s in quantized_scales(model))


def test_adapters_on_a_quantized_base_train_alone():
    """quantized='auto' with PEFT adapters on a quantized base is a ZO QLoRA: only the LoRA
    tensors move; codes and scales stay bit-identical."""
    peft = pytest.importorskip("peft")
    if not quant_available("bnb-nf4"):
        pytest.skip("bitsandbytes not installed")
    model = peft.get_peft_model(
        tiny_quantized_llama("bnb-nf4"),
        peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    batch = tiny_batch("llama")
    assert resolve_quantized(model, "auto") == "adapters"
    lora = {n for n, p in model.named_parameters() if p.requires_grad}
    before, scales = frozen_state(model), scales_state_dict(model)
    opt = ZOOptimizer(model, lr=1e-2, eps=1e-2)
    assert {s.name for s in opt.specs()} == lora
    for _ in range(3):
        opt.step(lambda: model(**batch).loss)
    after = frozen_state(model)
    moved = {k.removeprefix("param:") for k in before if not torch.equal(before[k], after[k])}
    assert moved == lora
    assert_same(scales_state_dict(model), scales)
    # explicitly asking for the scales trains them instead, adapters frozen
    opt = ZOOptimizer(model, quantized="scales", lr=0.0, eps=1e-3)
    assert {s.name for s in opt.specs()} == set(scales)
    assert {n for n in scales if ".base_layer." in n} == {
        f"base_model.model.{m}.base_layer.weight.absmax" for m in LINEARS if m.endswith(("q_proj", "v_proj"))
    }


def test_bitsandbytes_cpu_repacking_is_switched_off_for_training():
    """bitsandbytes repacks 4-bit weights for AVX512-BF16 CPU inference on the first forward in
    eval mode (codes rewritten, scales replaced by bf16 copies); a ZO run keeps its layers as
    they are, so evaluating between steps computes with the trained scales."""
    if not quant_available("bnb-nf4"):
        pytest.skip("bitsandbytes not installed")
    model = tiny_quantized_llama("bnb-nf4")
    batch = tiny_batch("llama")
    opt = ZOOptimizer(model, **hyper(model))
    opt.step(lambda: model(**batch).loss)
    before = frozen_state(model)
    model.eval()
    loss_of(model, batch)
    model.train()
    opt.step(lambda: model(**batch).loss)
    assert_same(frozen_state(model), before)
    assert all(s.current() is s.tensor and s.tensor.dtype == torch.float32 for s in quantized_scales(model))


def test_a_weight_replaced_after_setup_is_reported_not_trained():
    if not quant_available("torchao-int8"):
        pytest.skip("torchao not installed")
    model = tiny_quantized_llama("torchao-int8")
    batch = tiny_batch("llama")
    opt = ZOOptimizer(model, **hyper(model))
    q = model.model.layers[0].self_attn.q_proj
    q.weight = torch.nn.Parameter(q.weight.detach().clone(), requires_grad=False)  # e.g. a reload
    with pytest.raises(RuntimeError, match="q_proj.weight.scale.*no longer holds"):
        opt.step(lambda: model(**batch).loss)


def test_auto_mode_and_bad_input():
    float_model = tiny_hf_model("llama")
    assert resolve_quantized(float_model, "auto") == "none"
    assert {s.name for s in ZOOptimizer(float_model, lr=0.0).specs()} == {
        n for n, p in float_model.named_parameters() if p.requires_grad
    }
    with pytest.raises(ValueError, match="quantized='bogus' is not valid"):
        ZOConfig(quantized="bogus")
    before = {n: p.clone() for n, p in float_model.named_parameters()}
    with pytest.raises(ValueError, match=r"quantized='scales'.*no quantized layer.*quantization_config"):
        ZOOptimizer(float_model, lr=0.0, quantized="scales")
    with pytest.raises(ValueError, match=r"quantized='adapters'.*get_peft_model"):
        ZOOptimizer(float_model, lr=0.0, quantized="adapters")
    assert all(torch.equal(before[n], p) for n, p in float_model.named_parameters())
    if quant_available("torchao-int8"):
        model = tiny_quantized_llama("torchao-int8")
        scales = scales_state_dict(model)
        with pytest.raises(ValueError, match="forward-grad.*spsa"):
            ZOOptimizer(model, lr=0.0, estimator="forward-grad")
        assert_same(scales_state_dict(model), scales)
        none = ZOOptimizer(model, lr=0.0, quantized="none")  # the float tensors that require grad
        assert all(s.carrier is None for s in none.specs())
        with pytest.raises(ValueError, match="missing"):
            load_scales_state_dict(model, {})


@pytest.mark.skipif(not quant_available("bnb-nf4"), reason="bitsandbytes not installed")
def test_float32_scales_can_be_perturbed_in_place():
    """perturbation='in-place' writes float32 scales directly (no copies): within an ulp of
    the largest scale after the round trip, as for float32 weights."""
    model = tiny_quantized_llama("bnb-nf4")
    batch = tiny_batch("llama")
    scales = scales_state_dict(model)
    opt = ZOOptimizer(model, perturbation="in-place", **dict(hyper(model), lr=0.0))
    opt.step(lambda: model(**batch).loss)
    for n, v in scales_state_dict(model).items():
        ulp = torch.finfo(torch.float32).eps * float(scales[n].abs().max())
        assert float((v - scales[n]).abs().max()) <= 2 * ulp
    assert math.isfinite(opt.last_step.projected_grad) and opt.last_step.projected_grad != 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw", [{"offload": "cpu"}, {"schedule": "one-visit"}])
def test_offload_and_the_one_visit_schedule_are_refused_on_quantized_models(backend, kw):
    model = tiny_quantized_llama(backend)
    scales, frozen = scales_state_dict(model), frozen_state(model)
    with pytest.raises(ValueError, match=r"cannot run a quantized model .*schedule='per-forward'"):
        ZOOptimizer(model, **dict(hyper(model), **kw))
    assert_same(scales_state_dict(model), scales)
    assert_same(frozen_state(model), frozen)
    assert not hasattr(model, "_zo_offload")
