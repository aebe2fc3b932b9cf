"""Block offloading: peak memory, step time and bytes moved per ZO step, in memory vs
``offload="cpu"`` vs ``offload="disk"``; and a model whose weights exceed this machine's RAM,
trained from disk.

Each (model, mode) runs in its own subprocess.  Memory: the peak resident set (VmHWM, reset
through /proc/self/clear_refs once the model is built and offloaded) over the steps -- for
disk offload the resident pages of the memory-mapped block files count, which is why a block's
pages are dropped after its visit.  Bytes read / written per step: /proc/self/io's
read_bytes / write_bytes (what reached the storage device) and the offload's own count of
block bytes brought in.  The disk's bandwidth: ``dd`` with O_DIRECT on one block file.

    python benchmarks/offload.py                                  # OPT-1.3b shape: memory, cpu, disk
    python benchmarks/offload.py --models llama-7b --modes disk --steps 2 --offload-dir /scratch/zo
    python benchmarks/offload.py --quick                          # tiny shapes, a smoke run

On a GPU the same command measures the device path (blocks copied from pinned CPU memory or
read from the files into the device on each visit); figures here are from a CPU-only machine.
Writes JSON to benchmarks/results/offload-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = {
    "memory": "in memory, per-forward schedule (the default without offload)",
    "memory-onevisit": "in memory, one-visit schedule (both perturbed forwards in one pass)",
    "cpu": "offload='cpu' (on a CPU machine: the blocks are in RAM already; update on arrival)",
    "disk": "offload='disk' (blocks in memory-mapped safetensors files, pages dropped after each visit)",
}
SHAPES = {
    # OPT-1.3b: 1.3B parameters, 5.3 GB in float32
    "opt-1.3b": dict(kind="opt", hidden=2048, layers=24, ffn=8192, heads=32, vocab=50272),
    # Llama-2-7B's shape: 6.7B parameters, 27 GB (25.1 GiB) in float32 -- more than this machine's 24 GiB
    "llama-7b": dict(kind="llama", hidden=4096, layers=32, ffn=11008, heads=32, vocab=32000),
    "tiny": dict(kind="llama", hidden=64, layers=4, ffn=128, heads=4, vocab=256),
}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(key)


def _io() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/io").read_text().splitlines():
        k, v = line.split(":")
        out[k] = int(v)
    return out


def _config(shape: dict):
    import transformers as tf

    if shape["kind"] == "opt":
        return tf.OPTConfig(
            hidden_size=shape["hidden"],
            num_hidden_layers=shape["layers"],
            ffn_dim=shape["ffn"],
            num_attention_heads=shape["heads"],
            word_embed_proj_dim=shape["hidden"],
            vocab_size=shape["vocab"],
            max_position_embeddings=2048,
            dropout=0.0,
            attention_dropout=0.0,
        )
    return tf.LlamaConfig(
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["heads"],
        vocab_size=shape["vocab"],
        max_position_embeddings=2048,
        tie_word_embeddings=False,
    )


def _build(shape: dict, mode: str, offload_dir: str):
    import torch
    import transformers as tf

    cfg = _config(shape)
    cls = tf.OPTForCausalLM if shape["kind"] == "opt" else tf.LlamaForCausalLM
    if mode == "disk" and shape.get("on_disk"):
        # larger than memory: parameters on meta, blocks written straight to their files
        from accelerate import init_empty_weights

        from zo_plugins.core.offload import materialize_on_disk

        with init_empty_weights():
            model = cls(cfg)
        gen = torch.Generator().manual_seed(0)

        def init(name: str, t: torch.Tensor) -> None:
            if "norm" in name:
                t.fill_(1.0)
            else:
                t.normal_(0.0, 0.02, generator=gen)

        t0 = time.perf_counter()
        materialize_on_disk(model, offload_dir, init)
        return model, time.perf_counter() - t0
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = cls(cfg)
    return model, time.perf_counter() - t0


def child(name: str, mode: str, batch: int, seq: int, steps: int, threads: int, offload_dir: str) -> dict:
    import torch

    from zo_plugins import ZOOptimizer

    torch.set_num_threads(threads)
    shape = dict(SHAPES[name], on_disk=name == "llama-7b")
    model, build_s = _build(shape, mode, offload_dir)
    model.train()
    kw = {}
    if mode == "memory-onevisit":
        kw["schedule"] = "one-visit"
    elif mode in ("cpu", "disk"):
        kw.update(offload=mode, offload_dir=offload_dir)
    t0 = time.perf_counter()
    opt = ZOOptimizer(model, lr=1e-7, eps=1e-3, distribution="rademacher", **kw)
    setup_s = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(10, shape["vocab"], (batch, seq), generator=g)
    inputs = {"input_ids": ids, "labels": ids}
    n_params = sum(p.numel() for p in model.parameters())
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    block_bytes = 0
    if opt.offload is not None:
        block_bytes = sum(p.numel() * p.element_size() for b in opt.offload.blocks for p in b.parameters())
    base_rss = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to now
    times, cpu, reads, writes, bytes_in = [], [], [], [], []
    for _ in range(steps):
        io0 = _io()
        in0 = opt.offload.bytes_in if opt.offload is not None else 0
        t0, c0 = time.perf_counter(), time.process_time()
        opt.step(lambda: model(**inputs).loss)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        io1 = _io()
        reads.append(io1["read_bytes"] - io0["read_bytes"])
        writes.append(io1["write_bytes"] - io0["write_bytes"])
        bytes_in.append((opt.offload.bytes_in if opt.offload is not None else 0) - in0)
    peak = _status("VmHWM")
    t0 = time.perf_counter()
    opt.flush()
    flush_s = time.perf_counter() - t0
    return {
        "model": name,
        "mode": mode,
        "params": n_params,
        "model_bytes": model_bytes,
        "offloaded_block_bytes": block_bytes,
        "batch": batch,
        "seq": seq,
        "build_s": build_s,
        "setup_s": setup_s,
        "step_s": statistics.median(times[1:] if len(times) > 1 else times),
        "times_s": times,
        "cpu_s": statistics.median(cpu[1:] if len(cpu) > 1 else cpu),
        "cpu_times_s": cpu,
        "baseline_rss_mib": base_rss / 1024,
        "peak_rss_mib": peak / 1024,
        "read_bytes_per_step": reads,
        "write_bytes_per_step": writes,
        "block_bytes_in_per_step": bytes_in,
        "flush_s": flush_s,
        "dual_active": opt.schedule == "one-visit" and not opt.perturber.dual_off,
    }


def disk_bandwidth(path: Path) -> float | None:
    """Read bandwidth of the disk holding ``path`` in bytes/s (dd, O_DIRECT: no page cache)."""
    if not shutil.which("dd"):
        return None
    out = subprocess.run(
        ["dd", f"if={path}", "of=/dev/null", "bs=16M", "iflag=direct"], capture_output=True, text=True
    )
    line = (out.stderr.strip().splitlines() or [""])[-1]
    try:
        nbytes = int(line.split()[0])
        secs = float(line.split(",")[2].split()[0])
        return nbytes / secs
    except (IndexError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--models", nargs="+", default=["opt-1.3b"], choices=list(SHAPES))
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument(
        "--offload-dir", type=Path, default=None, help="folder for the block files (default: a temp dir)"
    )
    ap.add_argument("--quick", action="store_true", help="tiny shapes, two steps: a smoke run")
    ap.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    if args.quick:
        args.models, args.steps = ["tiny"], 2
    if args.child:
        name, mode = args.child
        print(
            json.dumps(
                child(name, mode, args.batch, args.seq, args.steps, args.threads, str(args.offload_dir))
            )
        )
        return
    results = []
    for name in args.models:
        for mode in args.modes:
            if name == "llama-7b" and mode != "disk":
                print(f"{name:10s} {mode:16s} skipped: {SHAPES[name]} does not fit in memory here")
                continue
            work = (
                Path(tempfile.mkdtemp(dir=args.offload_dir))
                if mode in ("cpu", "disk")
                else Path(tempfile.mkdtemp())
            )
            cmd = [
                sys.executable,
                __file__,
                "--child",
                name,
                mode,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
            ]
            cmd += ["--steps", str(args.steps), "--threads", str(args.threads), "--offload-dir", str(work)]
            t0 = time.perf_counter()
            out = subprocess.run(
                cmd, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1")
            )
            if out.returncode:
                raise SystemExit(f"{name}/{mode} failed:\n{out.stderr[-4000:]}")
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["wall_s"] = time.perf_counter() - t0
            r["command"] = " ".join(["python", *sys.argv])
            if mode == "disk":
                files = sorted(work.glob("block-*.safetensors"))
                r["disk_read_bandwidth_bytes_s"] = disk_bandwidth(files[0]) if files else None
            shutil.rmtree(work, ignore_errors=True)
            results.append(r)
            gb = 1e9
            print(
                f"{name:10s} {mode:16s} step {r['step_s']:8.2f} s (cpu {r['cpu_s']:8.2f} s)  peak RSS {r['peak_rss_mib']:9.1f} MiB "
                f"(model {r['model_bytes'] / 2**20:9.1f} MiB)  read/step {statistics.mean(r['read_bytes_per_step']) / gb:6.2f} GB  "
                f"written/step {statistics.mean(r['write_bytes_per_step']) / gb:6.2f} GB  "
                f"blocks in/step {statistics.mean(r['block_bytes_in_per_step']) / gb:6.2f} GB",
                flush=True,
            )
            bw = r.get("disk_read_bandwidth_bytes_s")
            if bw:
                ideal = r["offloaded_block_bytes"] / bw
                print(
                    f"{'':28s}disk read bandwidth {bw / gb:.2f} GB/s: one read of the blocks takes {ideal:.1f} s"
                )
    host = socket.gethostname().split(".")[0] or "host"
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"offload-{host}{'-quick' if args.quick else ''}.json"
    meta = {
        "machine": f"{platform.machine()} {os.cpu_count()} cpus, {platform.platform()}",
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(sys.argv),
    }
    prev = json.loads(out.read_text()) if out.exists() else {"runs": []}
    keep = [
        r
        for r in prev.get("runs", [])
        if (r["model"], r["mode"]) not in {(x["model"], x["mode"]) for x in results}
    ]
    out.write_text(json.dumps({**meta, "runs": keep + results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
