"""Quantized ZO on SmolLM2-135M (real weights): memory, step time and accuracy.

Modes (each in its own subprocess, so memory peaks do not mix):

* ``fp32-zo`` / ``bf16-zo``: full-parameter ZO (MeZO) on float32 / bfloat16 weights;
* ``int8-scales``: torchao ``Int8WeightOnlyConfig`` (8-bit codes, one scale per row), ZO on the
  scales (QZO); ``bnb-int8-scales``: the same on bitsandbytes' 8-bit layers;
* ``nf4-scales``: bitsandbytes NF4 (4-bit codes, one scale per block of 64), ZO on the scales;
* ``zo-qlora``: NF4 base + LoRA (r=8 on q_proj/v_proj), ZO on the adapters;
* ``qlora-backprop`` / ``qlora-backprop-ckpt``: the same adapters trained by backprop + AdamW
  (QLoRA), without / with gradient checkpointing (QLoRA's own setting);
* ``bf16-forward`` / ``nf4-forward``: one no-grad forward (inference), for reference;
* ``bf16-zo-chunk64k``: ``bf16-zo`` with ``chunk_size=65536`` (its stochastic rounding of a
  2**20-element chunk holds ~430 MiB of int64 temporaries in PyTorch ops).

Every quantized model keeps its unquantized tensors (embedding, norms) in bfloat16 and computes
in bfloat16, as ``bf16-zo`` does; transformers leaves SmolLM2's tied embedding (21% of the
parameters) unquantized in every back-end.

``--part memory`` measures each mode on one batch of 8 x 128 tokens (Rotten Tomatoes prompts,
left-padded to 128) with the embedded task's objective (cross-entropy over the two label words at
the answer position, ``logits_to_keep=2`` as in ``examples/rotten_tomatoes.py``): the weights'
bytes (every parameter, buffer and quantization-state tensor, counted once), the growth of
peak RSS during a step over the loaded model (VmHWM reset through ``/proc/self/clear_refs``
after loading and touching every weight page), their sum ("training memory"), and the median
step time over ``--repeats`` steps after a warm-up.

``--part accuracy`` trains each mode for ``--steps`` steps (batch 16, prompts <= 64 tokens,
the same batches in every mode) and reports held-out accuracy before and after.

    python benchmarks/quantized.py --part memory
    python benchmarks/quantized.py --part accuracy --modes nf4-scales --steps 60 --checkpoints 3 \
        --n-eval 200 --tag final-nf4-scales    # what docs/quantized.md quotes, one run per mode
    python benchmarks/quantized.py --part plot      # docs/img/quantized-memory.png from the JSON
                                                    # (+ quantized-accuracy.png from *-final*.json)

Writes ``benchmarks/results/quantized-<part>-<host>.json``.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import importlib.util
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"

MODES = {
    "bf16-forward": "bf16 weights, one no-grad forward (inference)",
    "nf4-forward": "NF4 weights, one no-grad forward (inference)",
    "fp32-zo": "float32 weights, full-parameter ZO (MeZO)",
    "bf16-zo": "bfloat16 weights, full-parameter ZO (MeZO), default chunk_size (2**20)",
    "bf16-zo-chunk64k": "as bf16-zo with chunk_size=65536 (smaller stochastic-rounding temporaries)",
    "int8-scales": "torchao Int8WeightOnlyConfig (8-bit), ZO on the row scales",
    "bnb-int8-scales": "bitsandbytes 8-bit (LLM.int8), ZO on the row scales",
    "nf4-scales": "bitsandbytes NF4 (4-bit), ZO on the block scales",
    "zo-qlora": "NF4 base + LoRA r=8 (q_proj, v_proj), ZO on the adapters",
    "qlora-backprop": "NF4 base + LoRA r=8 (q_proj, v_proj), backprop + AdamW (QLoRA)",
    "qlora-backprop-ckpt": "as qlora-backprop, with gradient checkpointing (QLoRA's setting)",
}
# (lr, eps) per mode for the accuracy part.  eps and lr are in the units of the trained tensors
# (zo_plugins.quant.describe, measured on SmolLM2-135M): the linear weights' RMS is 0.19;
# torchao's int8 scale is a row's absmax / 127 (RMS 5.6e-3), bitsandbytes' NF4 absmax a block
# of 64's absmax (RMS 0.53), its int8 SCB a row's absmax (RMS 0.71 = 127 x torchao's).  Changing
# a tensor's unit by c scales the same run's eps by c and its lr by c**2, so the int8 and NF4
# rows are the same relative setting (eps ~0.2% of the RMS); docs/quantized.md.
HYPER = {
    "fp32-zo": (1e-5, 1e-3),
    "bf16-zo": (1e-5, 1e-3),
    "bf16-zo-chunk64k": (1e-5, 1e-3),
    "int8-scales": (2e-7, 1e-5),
    "bnb-int8-scales": (1e-3, 1e-3),
    "nf4-scales": (1e-3, 1e-3),
    "zo-qlora": (3e-3, 1e-2),  # docs/benchmarks.md: a 50-step LoRA probe moved at 3e-3, not at 1e-3
    "qlora-backprop": (3e-4, None),
    "qlora-backprop-ckpt": (3e-4, None),
}


# ------------------------------------------------------------------------------------ child
def load_example():
    spec = importlib.util.spec_from_file_location("rt_example", ROOT / "examples" / "rotten_tomatoes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rt_example"] = mod
    spec.loader.exec_module(mod)
    return mod


def import_everything() -> None:
    """Every mode imports the same libraries, so their runtime footprint is the same."""
    import bitsandbytes  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import torchao.quantization  # noqa: F401
    import transformers  # noqa: F401

    import zo_plugins  # noqa: F401
    from zo_plugins import quant  # noqa: F401


def build(mode: str):
    """(model, trainable description) for ``mode``: the quantized modes load through
    transformers' ``quantization_config`` from the cached safetensors of SmolLM2."""
    import torch
    import transformers as tf

    from zo_plugins.assets import smollm2_path

    path = smollm2_path()
    bf16 = torch.bfloat16
    if mode in ("fp32-zo",):
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if mode in ("bf16-zo", "bf16-zo-chunk64k", "bf16-forward"):
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=bf16)
    if mode == "int8-scales":
        from torchao.quantization import Int8WeightOnlyConfig

        q = tf.TorchAoConfig(Int8WeightOnlyConfig())
        return tf.AutoModelForCausalLM.from_pretrained(path, dtype=bf16, quantization_config=q)
    if mode == "bnb-int8-scales":
        q = tf.BitsAndBytesConfig(load_in_8bit=True)
        return tf.AutoModelForCausalLM.from_pretrained(
            path, dtype=bf16, quantization_config=q, device_map="cpu"
        )
    q = tf.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=bf16)
    model = tf.AutoModelForCausalLM.from_pretrained(path, dtype=bf16, quantization_config=q, device_map="cpu")
    if mode in ("zo-qlora", "qlora-backprop", "qlora-backprop-ckpt"):
        from peft import LoraConfig, get_peft_model

        if mode == "qlora-backprop-ckpt":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"])
        model = get_peft_model(model, cfg)
    return model


def storages(model) -> list:
    """Every tensor the model holds (parameters, buffers, quantization state), once."""
    import torch

    from zo_plugins.quant import iter_inner

    out, seen = [], set()

    def add(t):
        if isinstance(t, torch.Tensor) and t.data_ptr() not in seen and t.numel():
            seen.add(t.data_ptr())
            out.append(t)

    for mod in model.modules():
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is None:
                continue
            if type(t).__module__.startswith("torchao"):
                for _, inner in iter_inner(t):
                    add(inner)
                continue
            add(t)
            qs = getattr(t, "quant_state", None)
            if qs is not None:
                for v in (qs.absmax, qs.code, getattr(qs, "offset", None)):
                    add(v)
                if getattr(qs, "state2", None) is not None:
                    add(qs.state2.absmax)
                    add(qs.state2.code)
        state = getattr(mod, "state", None)
        for k in ("CB", "SCB"):
            add(getattr(state, k, None))
    return out


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # return freed loading buffers to the OS
    except OSError:
        pass


def memory_batch(ex, tok, label_ids, batch: int, seq: int):
    """``batch`` Rotten Tomatoes prompts, left-padded to exactly ``seq`` tokens."""
    import torch

    splits = ex.load_splits(200, 64, 0)
    ds = ex.PromptDataset(splits.train[:batch], tok, label_ids, seq)
    collate = ex.make_collator(tok.pad_token_id)
    b = collate([ds[i] for i in range(batch)])
    pad = seq - b["input_ids"].shape[1]
    if pad > 0:
        b["input_ids"] = torch.cat([torch.full((batch, pad), tok.pad_token_id), b["input_ids"]], 1)
        b["attention_mask"] = torch.cat([torch.zeros(batch, pad, dtype=torch.long), b["attention_mask"]], 1)
        b["position_ids"] = (b["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return b


def make_step(
    mode: str, model, objective, batch, lr: float, eps: float | None, seed: int = 0, clip: float | None = None
):
    """A function running one training step of ``mode`` on ``batch``."""
    import torch

    from zo_plugins import ZOOptimizer

    if mode.endswith("-forward"):

        def forward():
            with torch.no_grad():
                objective(model, batch)

        return forward, None
    if mode.startswith("qlora-backprop"):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr)

        def backprop(b=None):
            opt.zero_grad(set_to_none=True)
            objective(model, b or batch).backward()
            opt.step()

        return backprop, opt
    quantized = {"zo-qlora": "adapters"}.get(mode, "scales" if mode.endswith("-scales") else "none")
    extra = {"chunk_size": 65536} if mode.endswith("-chunk64k") else {}
    if clip is not None:  # QZO's directional-derivative clipping
        extra["clip_projected_grad"] = clip
    if mode.startswith(("fp32-zo", "bf16-zo")):
        for p in model.parameters():
            p.requires_grad_(True)
    opt = ZOOptimizer(model, lr=lr, eps=eps, seed=seed, quantized=quantized, **extra)

    def zo(b=None):
        opt.step(lambda: objective(model, b or batch))

    return zo, opt


def child_memory(mode: str, batch: int, seq: int, repeats: int, threads: int) -> dict:
    import torch

    torch.set_num_threads(threads)
    import_everything()
    ex = load_example()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from zo_plugins.assets import smollm2_path

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    label_ids = ex.label_token_ids(tok)
    data = memory_batch(ex, tok, label_ids, batch, seq)
    objective = ex.label_word_objective(label_ids)
    trim()
    runtime = _status("VmRSS")
    model = build(mode)
    model.train()
    contiguous_head_input(model)
    tensors = storages(model)
    with torch.no_grad():  # fault in every weight page (mmapped safetensors) before the baseline
        for t in tensors:
            t.reshape(-1).view(torch.uint8).sum()
    weight_bytes = sum(t.numel() * t.element_size() for t in tensors)
    lr, eps = HYPER.get(mode, (0.0, 1e-3))  # a real lr: the update pass does its full work
    step, opt = make_step(mode, model, objective, data, lr=lr, eps=eps or 1e-3)
    trained = trained_numel(mode, model, opt)
    trim()
    loaded = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    step()  # warm-up: allocates optimizer state, grads, first-use buffers
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = _status("VmHWM")
    growth = (peak - loaded) * 1024
    return {
        "mode": mode,
        "trained_numel": trained,
        "weight_mib": weight_bytes / 2**20,
        "peak_growth_mib": growth / 2**20,
        "training_memory_mib": (weight_bytes + growth) / 2**20,
        "peak_rss_mib": peak / 1024,
        "peak_over_runtime_mib": (peak - runtime) / 1024,
        "runtime_rss_mib": runtime / 1024,
        "step_s": statistics.median(times),
        "times_s": times,
    }


def opt_is_zo(mode: str) -> bool:
    return not mode.startswith("qlora-backprop") and not mode.endswith("-forward")


def contiguous_head_input(model) -> None:
    """Hand the LM head a contiguous input in every mode.  PyTorch 2.13's CPU bf16 matmul of a
    strided 3-D input (HF's ``logits_to_keep`` slice) with a weight that does not require grad
    materialises the weight once per batch row: +432 MiB for SmolLM2's head at batch 8, which
    would fall on the modes with a frozen head (PEFT's) and not on the others."""
    for name, mod in model.named_modules():
        if name.endswith("lm_head"):
            mod.register_forward_pre_hook(lambda m, args: (args[0].contiguous(), *args[1:]))


def trained_numel(mode: str, model, opt) -> int:
    if opt is None:
        return 0
    if opt_is_zo(mode):
        return sum(s.param.numel() for s in opt.specs())
    return sum(p.numel() for g in opt.param_groups for p in g["params"])


def evaluate_items(model, dataset, collate, label_ids, batch_size: int) -> dict:
    """``examples/rotten_tomatoes.py``'s ``evaluate`` (argmax over the two label words at the
    answer position) plus each example's 0/1 correctness, so the gain's standard error can be
    paired (the same examples before and after)."""
    import torch

    model.eval()
    correct, loss_sum, pred_pos = [], 0.0, 0
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            out = model(**batch)
            logits = out.logits[:, 0, :]
            y = torch.tensor([dataset.items[i][1] for i in range(start, start + len(logits))])
            pred = logits[:, list(label_ids)].argmax(-1)
            correct += (pred == y).long().tolist()
            pred_pos += int(pred.sum())
            loss_sum += float(out.loss) * len(logits)
    n = len(correct)
    acc = sum(correct) / n
    return {
        "accuracy": acc,
        "accuracy_se": (acc * (1 - acc) / n) ** 0.5,
        "loss": loss_sum / n,
        "predicted_positive": pred_pos / n,
        "n": n,
        "correct": correct,
    }


def paired_gain(before: dict, after: dict) -> tuple[float, float]:
    """(gain, its standard error) over the same examples: the SE of the mean per-example
    difference, smaller than two independent accuracies' when the model keeps most answers."""
    d = [a - b for a, b in zip(after["correct"], before["correct"])]
    n = len(d)
    mean = sum(d) / n
    var = sum((x - mean) ** 2 for x in d) / max(1, n - 1)
    return mean, (var / n) ** 0.5


def child_accuracy(mode: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    import_everything()
    ex = load_example()
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from zo_plugins.assets import smollm2_path
    from zo_plugins.quant import prepare

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(smollm2_path())
    label_ids = ex.label_token_ids(tok)
    splits = ex.load_splits(args.n_eval, args.n_train, args.seed)
    train_ds = ex.PromptDataset(splits.train, tok, label_ids, args.max_length)
    eval_ds = ex.PromptDataset(splits.eval, tok, label_ids, args.max_length)
    collate = ex.make_collator(tok.pad_token_id)
    objective = ex.label_word_objective(label_ids)
    model = build(mode)
    contiguous_head_input(model)
    prepare(model)  # bitsandbytes: evaluate with the layers training uses (no CPU repacking)
    lr, eps = HYPER[mode]
    lr = args.lr.get(mode, lr)
    eps = args.eps.get(mode, eps)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_ds), generator=g).tolist()

    def batch_at(step: int):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        return collate([train_ds[i] for i in idx])

    clip = args.clip.get(mode)
    step, opt = make_step(mode, model, objective, batch_at(0), lr=lr, eps=eps, seed=args.seed, clip=clip)
    before = evaluate_items(model, eval_ds, collate, label_ids, args.eval_batch_size)
    model.train()
    print(
        f"  {mode}: before {before['accuracy']:.3f} (lr {lr:g}, eps {eps}, clip {clip})",
        file=sys.stderr,
        flush=True,
    )
    curve = [{"step": 0, **before}]
    last, window = before, []
    train_time = 0.0
    every = max(1, args.steps // args.checkpoints)
    for t in range(args.steps):
        t0 = time.perf_counter()
        step(batch_at(t))
        train_time += time.perf_counter() - t0
        if opt_is_zo(mode):
            info = opt.last_step
            window.append(
                (0.5 * (info.loss_plus + info.loss_minus), abs(info.projected_grad), info.update_norm)
            )
        if (t + 1) % every == 0 or t + 1 == args.steps:
            res = evaluate_items(model, eval_ds, collate, label_ids, args.eval_batch_size)
            model.train()
            if window:  # the training objective and |projected gradient| since the last checkpoint
                res["train_loss"] = statistics.fmean(w[0] for w in window)
                res["abs_projected_grad"] = statistics.fmean(w[1] for w in window)
                res["update_norm"] = statistics.fmean(w[2] for w in window)
                window.clear()
            res["gain"], res["gain_se_paired"] = paired_gain(before, res)
            curve.append({"step": t + 1, **res})
            last = res
            line = {k: v for k, v in res.items() if k != "correct"}
            print(
                f"  CHECKPOINT {json.dumps({'mode': mode, 'step': t + 1, **line})}",
                file=sys.stderr,
                flush=True,
            )
            print(
                f"  {mode}: step {t + 1} acc {res['accuracy']:.3f} loss {res['loss']:.4f} "
                f"train {res.get('train_loss', float('nan')):.4f} |g| {res.get('abs_projected_grad', float('nan')):.3g}",
                file=sys.stderr,
                flush=True,
            )
    gain, gain_se = paired_gain(before, last)
    strip = lambda r: {k: v for k, v in r.items() if k != "correct"}  # noqa: E731
    return {
        "mode": mode,
        "lr": lr,
        "eps": eps,
        "steps": args.steps,
        "trained_numel": trained_numel(mode, model, opt),
        "before": strip(before),
        "after": strip(last),
        "gain": gain,
        "gain_se_paired": gain_se,
        "curve": [strip(c) for c in curve],
        "train_time_s": train_time,
        "clip_projected_grad": clip,
        "clipped_steps": opt.clipped_steps if clip is not None else 0,
        "step_s_mean": train_time / max(1, args.steps),
    }


# ----------------------------------------------------------------------------------- parent
def run_child(argv: list[str]) -> dict:
    cmd = [sys.executable, __file__, *argv]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, env=env)
    if out.returncode:
        raise SystemExit(f"{' '.join(argv)} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def machine(threads: int) -> dict:
    import torch

    return {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
    }


def memory_ratios(res: dict[str, dict]) -> dict[str, float]:
    m = {k: v["training_memory_mib"] for k, v in res.items()}
    out = {}
    for a, b in [
        ("nf4-scales", "bf16-zo"),
        ("nf4-scales", "bf16-zo-chunk64k"),
        ("nf4-scales", "nf4-forward"),
        ("nf4-scales", "qlora-backprop"),
        ("nf4-scales", "qlora-backprop-ckpt"),
        ("int8-scales", "bf16-zo"),
        ("zo-qlora", "qlora-backprop"),
        ("bf16-zo", "fp32-zo"),
    ]:
        if a in m and b in m:
            out[f"{a} / {b}"] = m[a] / m[b]
    return out


def plot(mem_json: Path, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep = json.loads(mem_json.read_text())
    res = rep["results"]
    modes = [m for m in MODES if m in res and not m.endswith("-forward")]
    w = [res[m]["weight_mib"] for m in modes]
    g = [res[m]["peak_growth_mib"] for m in modes]
    fig, ax = plt.subplots(figsize=(8, 5))
    ax.barh(modes, w, color="#4c72b0", label="weights (+ quantization state)")
    ax.barh(modes, g, left=w, color="#dd8452", label="step's peak growth (activations, copies, grads, AdamW)")
    for i, m in enumerate(modes):
        ax.text(
            w[i] + g[i] + 8, i, f"{w[i] + g[i]:.0f} MiB, {res[m]['step_s']:.1f} s", va="center", fontsize=8
        )
    total = dict(zip(modes, (a + c for a, c in zip(w, g))))
    for ref, frac, ls in (
        ("bf16-zo", 3, "--"),
        ("qlora-backprop", 4, ":"),
    ):  # the goals for nf4-scales
        if ref in total:
            ax.axvline(total[ref] / frac, color="k", lw=0.9, ls=ls, label=f"goal: {ref} / {frac}")
    ax.invert_yaxis()
    ax.set_xlabel("training memory (MiB): weights + peak RSS growth of a step")
    b, s = rep["batch"], rep["seq"]
    m = rep["machine"]
    ax.set_title(
        f"SmolLM2-135M, batch {b} x {s}: {m['threads']} threads on {m['cores']} {m['cpu']} cores, "
        f"torch {m['torch']}, {m['date']}\npython benchmarks/quantized.py --part memory",
        fontsize=9,
    )
    ax.set_xlim(0, max(a + c for a, c in zip(w, g)) * 1.35)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_png}")


def plot_accuracy(paths: list[Path], out_png: Path) -> None:
    """Held-out accuracy against ZO steps for every run in ``paths`` (one standard error bars)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs, rep = [], None
    for p in paths:
        rep = json.loads(p.read_text())
        runs += list(rep["results"].values())
    if not runs:
        return
    order = list(MODES)
    runs.sort(
        key=lambda r: (
            order.index(r["mode"]) if r["mode"] in order else 99,
            r.get("clip_projected_grad") or 0,
        )
    )
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for k, r in enumerate(runs):
        xs = [c["step"] + 0.6 * (k - len(runs) / 2) for c in r["curve"]]  # offset: bars stay apart
        ys = [c["accuracy"] for c in r["curve"]]
        es = [c.get("accuracy_se", 0.0) for c in r["curve"]]
        label = f"{r['mode']} (lr {r['lr']:g}, eps {r['eps']:g}"
        label += f", clip {r['clip_projected_grad']:g})" if r.get("clip_projected_grad") else ")"
        label += " stopped early" if r.get("partial") else ""
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_xlabel("ZO steps (batch 16, the same batches in every run)")
    ax.set_ylabel(f"accuracy on {runs[0]['curve'][0].get('n', 200)} held-out snippets")
    m = rep["machine"]
    ax.set_title(
        f"SmolLM2-135M on Rotten Tomatoes: {m['threads']} threads on {m['cores']} {m['cpu']} cores, "
        f"torch {m['torch']}, {m['date']}\npython benchmarks/quantized.py --part accuracy "
        "(each run's flags: docs/quantized.md)",
        fontsize=8,
    )
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    print(f"wrote {out_png}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["memory", "accuracy", "plot"], default="memory")
    ap.add_argument("--child", metavar="MODE", help=argparse.SUPPRESS)
    ap.add_argument("--modes", nargs="+", choices=list(MODES), default=None)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    # 1 thread: on a shared, oversubscribed CPU two OpenMP threads spin at every barrier (measured:
    # a bf16 pow + mean over 2 x 32 x 576 took 59 ms with 2 threads, 0.13 ms with 1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--checkpoints", type=int, default=2, help="evaluations during training (accuracy)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=200)
    ap.add_argument("--n-train", type=int, default=None)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--lr", type=json.loads, default={}, help="per-mode override, e.g. '{\"nf4-scales\": 3e-3}'"
    )
    ap.add_argument("--eps", type=json.loads, default={}, help="per-mode override of eps")
    ap.add_argument(
        "--clip",
        type=json.loads,
        default={},
        help="per-mode clip_projected_grad (QZO's clipping), e.g. '{\"int8-scales\": 1000}'",
    )
    ap.add_argument("--tag", default="", help="suffix of the output file")
    ap.add_argument(
        "--host",
        default=socket.gethostname(),
        help="--part plot: draw the results this host wrote (the docs quote host 'vm')",
    )
    args = ap.parse_args()
    host = args.host
    if args.child:
        res = (
            child_memory(args.child, args.batch, args.seq, args.repeats, args.threads)
            if args.part == "memory"
            else child_accuracy(args.child, args)
        )
        print(json.dumps(res))
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    if args.part == "plot":
        plot(RESULTS / f"quantized-memory-{host}.json", ROOT / "docs" / "img" / "quantized-memory.png")
        acc = sorted(RESULTS.glob(f"quantized-accuracy-{host}-final*.json"))  # the runs the docs quote
        if acc:
            plot_accuracy(acc, ROOT / "docs" / "img" / "quantized-accuracy.png")
        return
    modes = args.modes or (
        # accuracy: bf16 ZO with 64k chunks (the same algorithm; 21 s a step here instead of 130 s)
        list(MODES) if args.part == "memory" else [m for m in HYPER if m != "bf16-zo"]
    )
    report = {"machine": machine(args.threads), "part": args.part, "modes": {m: MODES[m] for m in modes}}
    report.update(batch=args.batch, seq=args.seq) if args.part == "memory" else report.update(
        steps=args.steps, batch_size=args.batch_size, max_length=args.max_length, n_eval=args.n_eval
    )
    passthrough = [
        "--part", args.part, "--batch", str(args.batch), "--seq", str(args.seq), "--repeats", str(args.repeats),
        "--threads", str(args.threads), "--steps", str(args.steps), "--checkpoints", str(args.checkpoints),
        "--batch-size", str(args.batch_size), "--max-length", str(args.max_length), "--n-eval", str(args.n_eval),
        "--eval-batch-size", str(args.eval_batch_size), "--seed", str(args.seed),
        "--lr", json.dumps(args.lr), "--eps", json.dumps(args.eps), "--clip", json.dumps(args.clip),
    ]  # fmt: skip
    if args.n_train is not None:
        passthrough += ["--n-train", str(args.n_train)]
    results = {}
    for mode in modes:
        r = results[mode] = run_child(["--child", mode, *passthrough])
        if args.part == "memory":
            print(
                f"{mode:20s} weights {r['weight_mib']:7.1f} MiB  step growth {r['peak_growth_mib']:7.1f} MiB  "
                f"training memory {r['training_memory_mib']:7.1f} MiB  peak RSS {r['peak_rss_mib']:7.1f} MiB  "
                f"step {r['step_s']:6.2f} s  trained {r['trained_numel']:,}",
                flush=True,
            )
        else:
            print(
                f"{mode:20s} accuracy {r['before']['accuracy']:.3f} -> {r['after']['accuracy']:.3f} "
                f"({r['gain']:+.3f} +- {r['gain_se_paired']:.3f} paired SE, n {r['after']['n']}) in {r['steps']} steps, lr {r['lr']:g}, {r['train_time_s']:.0f} s",
                flush=True,
            )
    report["results"] = results
    if args.part == "memory":
        report["ratios"] = memory_ratios(results)
        for k, v in report["ratios"].items():
            print(f"training memory {k:40s} {v:6.3f}")
    suffix = f"-{args.tag}" if args.tag else ""
    path = RESULTS / f"quantized-{args.part}-{host}{suffix}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
