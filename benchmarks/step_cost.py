"""Cost of a ZO step against a forward, backprop+AdamW and the naive 4-pass MeZO step.

Each (model, mode) runs in its own subprocess so memory peaks do not mix.  Memory is the
growth of peak RSS (VmHWM, reset through /proc/self/clear_refs after loading and touching the
weights) over the loaded model; time is the median of ``--repeats`` steps after one warm-up.
Printed ratios come from one invocation, so machine drift affects all modes alike.

    python benchmarks/step_cost.py                      # SmolLM2-135M, OPT-125m, OPT-350m shapes
    python benchmarks/step_cost.py --models opt-125m --batch 8 --seq 128

Writes a table to stdout and JSON to ``benchmarks/results/step_cost-<host>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

MODES = {
    "forward": "no-grad forward with loss (inference)",
    "zo": "ZOOptimizer.step, gaussian, defaults (perturbation='auto': out of place with the model)",
    "zo-inplace": "ZOOptimizer.step, gaussian, perturbation='in-place' (the 0.1 default for float32)",
    "zo-outofplace": "ZOOptimizer.step, gaussian, perturbation='out-of-place' (exact restore)",
    "zo-onevisit": "ZOOptimizer.step, gaussian, schedule='one-visit' (both forwards in one pass, batch 2B)",
    "zo-rademacher": "ZOOptimizer.step, rademacher, defaults (cheapest directions)",
    "zo-forward-grad": "ZOOptimizer.step, estimator='forward-grad' (one forward-mode AD pass: exact grad . z)",
    "zo-fzoo": "ZOOptimizer.step, estimator='fzoo', n_queries=4, rademacher (FZOO: 5 forwards, one probe each)",
    "naive-mezo": "reference MeZO step: 4 out-of-place passes, full-size z per tensor, global RNG reseeded",
    "adamw": "forward + backward + torch.optim.AdamW step",
}
MODELS = ("smollm2-135m", "opt-125m", "opt-350m")
CPU_TIME = False
"""--cpu-time: ratios of process CPU seconds instead of wall-clock (for a machine shared with
other work, where wall-clock ratios mostly measure the neighbours)."""


# ---------------------------------------------------------------------------------- child
def _build(name: str):
    import torch
    import transformers as tf

    torch.manual_seed(0)
    if name == "smollm2-135m":
        from zo_plugins.assets import load_smollm2

        model, _ = load_smollm2()
        return model
    if name == "opt-125m":
        cfg = tf.OPTConfig(
            hidden_size=768,
            num_hidden_layers=12,
            ffn_dim=3072,
            num_attention_heads=12,
            word_embed_proj_dim=768,
            vocab_size=50272,
            max_position_embeddings=2048,
        )
    elif name == "opt-350m":
        cfg = tf.OPTConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            ffn_dim=4096,
            num_attention_heads=16,
            word_embed_proj_dim=512,
            vocab_size=50272,
            max_position_embeddings=2048,
            do_layer_norm_before=False,
        )
    else:
        raise SystemExit(f"unknown model {name!r}; choose from {MODELS}")
    cfg.dropout = cfg.attention_dropout = 0.0
    return tf.OPTForCausalLM(cfg)


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _vm_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


def child(model_name: str, mode: str, batch: int, seq: int, repeats: int, threads: int) -> dict:
    import torch

    from zo_plugins import ZOOptimizer

    torch.set_num_threads(threads)
    model = _build(model_name)
    model.train()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, vocab, (batch, seq), generator=g)
    inputs = {"input_ids": ids, "labels": ids}
    with torch.no_grad():  # touch every weight page (mmapped safetensors) before the baseline
        for p in model.parameters():
            p.add_(0)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss():
        return model(**inputs).loss

    if mode == "forward":

        def step():
            with torch.no_grad():
                loss()
    elif mode.startswith("zo"):
        kw = {"perturbation": "out-of-place"} if mode == "zo-outofplace" else {}
        if mode == "zo-inplace":
            kw["perturbation"] = "in-place"
        if mode == "zo-onevisit":
            kw["schedule"] = "one-visit"
        if mode == "zo-rademacher":
            kw["distribution"] = "rademacher"
        if mode == "zo-forward-grad":
            kw["estimator"] = "forward-grad"
        if mode == "zo-fzoo":
            kw.update(estimator="fzoo", n_queries=4, distribution="rademacher")
        opt = ZOOptimizer(model, lr=1e-7, eps=1e-3, **kw)

        def step():
            opt.step(loss)
    elif mode == "naive-mezo":
        eps, lr, state = 1e-3, 1e-7, {"t": 0}

        def perturb(scale, seed):
            torch.manual_seed(seed)
            for p in params:
                z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)
                p.data = p.data + scale * eps * z

        def step():
            seed = state["t"] = state["t"] + 1
            with torch.no_grad():
                perturb(1, seed)
                lp = loss().item()
                perturb(-2, seed)
                lm = loss().item()
                perturb(1, seed)
                grad = (lp - lm) / (2 * eps)
                torch.manual_seed(seed)
                for p in params:
                    z = torch.normal(0, 1, size=p.shape, dtype=p.dtype)
                    p.data = p.data - lr * grad * z
    elif mode == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-7)

        def step():
            opt.zero_grad(set_to_none=False)
            loss().backward()
            opt.step()
    else:
        raise SystemExit(f"unknown mode {mode!r}")

    base = _vm_rss_kib()
    _reset_peak()
    step()  # warm-up (allocates optimizer state, grads)
    times, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    peak = _vm_hwm_kib()
    return {
        "model": model_name,
        "mode": mode,
        "params": sum(p.numel() for p in params),
        "step_s": statistics.median(times),
        "times_s": times,
        "cpu_s": statistics.median(cpu),
        "cpu_times_s": cpu,
        "peak_growth_mib": (peak - base) / 1024,
    }


# ---------------------------------------------------------------------------------- parent
def run_mode(args, model: str, mode: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        model,
        mode,
        "--batch",
        str(args.batch),
        "--seq",
        str(args.seq),
        "--repeats",
        str(args.repeats),
        "--threads",
        str(args.threads),
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if out.returncode:
        raise SystemExit(f"{model}/{mode} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ratios(res: dict[str, dict]) -> dict[str, float]:
    """Every ratio whose modes ran in this invocation."""
    t = {m: r["cpu_s" if CPU_TIME else "step_s"] for m, r in res.items()}
    mem = {m: r["peak_growth_mib"] for m, r in res.items()}
    spec = {
        "zo step / 2 forwards (gaussian, default)": (t, "zo", "forward", 2),
        "zo step / 2 forwards (rademacher, default)": (t, "zo-rademacher", "forward", 2),
        "zo step / 2 forwards (gaussian, out-of-place)": (t, "zo-outofplace", "forward", 2),
        "zo step / 2 forwards (gaussian, in-place)": (t, "zo-inplace", "forward", 2),
        "zo step / 2 forwards (gaussian, one-visit)": (t, "zo-onevisit", "forward", 2),
        "one-visit step / default step": (t, "zo-onevisit", "zo", 1),
        "one-visit peak growth / default peak growth": (mem, "zo-onevisit", "zo", 1),
        "zo peak growth / inference peak growth (default)": (mem, "zo", "forward", 1),
        "zo peak growth / inference peak growth (out-of-place)": (mem, "zo-outofplace", "forward", 1),
        "adamw peak growth / zo peak growth (default)": (mem, "adamw", "zo", 1),
        "forward-grad step / 1 forward": (t, "zo-forward-grad", "forward", 1),
        "forward-grad peak growth / inference peak growth": (mem, "zo-forward-grad", "forward", 1),
        "fzoo step / 5 forwards (N = 4)": (t, "zo-fzoo", "forward", 5),
        "fzoo peak growth / zo peak growth (default)": (mem, "zo-fzoo", "zo", 1),
        "naive MeZO step / our step (gaussian, default)": (t, "naive-mezo", "zo", 1),
        "naive MeZO step / our step (rademacher, default)": (t, "naive-mezo", "zo-rademacher", 1),
    }
    return {k: d[a] / (n * d[b]) for k, (d, a, b, n) in spec.items() if a in d and b in d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--cpu-time",
        action="store_true",
        help="ratios of process CPU seconds (a shared machine), not wall-clock",
    )
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    global CPU_TIME
    CPU_TIME = args.cpu_time
    if args.child:
        print(json.dumps(child(*args.child, args.batch, args.seq, args.repeats, args.threads)))
        return

    report = {
        "machine": {
            "host": socket.gethostname(),
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "threads": args.threads,
            "python": platform.python_version(),
        },
        "date": time.strftime("%Y-%m-%d"),
        "batch": args.batch,
        "seq": args.seq,
        "repeats": args.repeats,
        "ratios_of": "process CPU seconds" if args.cpu_time else "wall-clock seconds",
        "modes": MODES,
        "results": {},
    }
    import torch

    report["machine"]["torch"] = torch.__version__
    for model in args.models:
        res = {}
        for mode in args.modes:
            res[mode] = run_mode(args, model, mode)
            r = res[mode]
            print(
                f"{model:14s} {mode:14s} step {r['step_s']:7.3f} s (cpu {r['cpu_s']:7.3f} s)   "
                f"peak growth {r['peak_growth_mib']:8.1f} MiB",
                flush=True,
            )
        entry = {"runs": res}
        entry["ratios"] = ratios(res)
        if entry["ratios"]:
            for k, v in entry["ratios"].items():
                print(f"{model:14s} {k:55s} {v:6.2f}")
        report["results"][model] = entry
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"step_cost-{socket.gethostname()}.json"
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
