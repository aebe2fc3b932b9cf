"""Many-process ZO on CPU (gloo): throughput, bytes communicated and memory per rank.

For 1, 2 and 4 processes (``torchrun``) and each mode:

* ``zo-ddp``     -- ``ZOOptimizer`` on a DDP-wrapped model, each rank its own batch (DDP idle);
* ``zo-pairs``   -- ``ZOOptimizer(perturbation_parallel=True)``: pairs of ranks split the two
  perturbed forwards of one batch (2 and 4 processes);
* ``zo-fsdp``    -- ``ZOOptimizer`` on an FSDP2 model (``fully_shard`` per decoder layer and on
  the root), each rank its own batch and its own shards (out of place: exact);
* ``zo-fsdp-inplace`` -- the same with ``perturbation='in-place'`` (restore within an ulp);
* ``bp-ddp``     -- backprop + SGD under DDP, the comparison for bytes: the whole gradient.

Every rank runs ``--steps`` timed steps after one warm-up step.  Reported per configuration:

* ``samples_per_s`` -- samples of the global batch per step (pairs: one batch per pair) over
  the slowest rank's mean step time (wall clock);
* ``cpu_s`` / ``samples_per_s_dedicated`` -- the busiest rank's CPU seconds per step
  (``time.process_time``) and the global batch over it: the throughput with one dedicated core
  per rank and free communication.  On a shared machine the scheduler gives N processes a
  larger share of the cores than one, so wall-clock scaling measures the share as much as the
  method; CPU time does not depend on it;
* ``bytes_per_step`` -- per rank, the bytes of the tensors it hands to collectives in one step
  (``all_reduce`` input; ``all_gather_single`` / ``all_gather_into_tensor`` input and, as
  ``gathered``, output; DDP's gradient buckets through a counting comm hook), counted by
  wrapping the ``torch.distributed`` functions -- payload, not wire bytes (a ring all-reduce
  moves ~2(W-1)/W of it per rank);
* ``peak_mib`` / ``model_mib`` -- per rank, VmHWM and VmRSS after building the model, minus the
  RSS after imports and process-group set-up (the peak is reset there), so what is reported
  is the model's memory plus the step's transient, not the interpreter's.

The model is built on the meta device and materialised after sharding (FSDP2 ranks never hold
the whole model); weights are random (N(0, 0.02), LayerNorm 1/0).  With more processes than
cores the ranks time-share: compare ratios within one run, and read 4-process figures on a
2-core machine as time-shared.

    python benchmarks/scaling.py                          # OPT-125m shape, all modes, 1/2/4 processes
    python benchmarks/scaling.py --size tiny --steps 2    # a quick check
    python benchmarks/scaling.py --plot benchmarks/results/scaling-<host>.json   # redraw the PNG

Writes ``benchmarks/results/scaling-<host>.json`` and ``docs/img/scaling.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = ("zo-ddp", "zo-pairs", "zo-fsdp", "zo-fsdp-inplace", "bp-ddp")
WORLDS = (1, 2, 4)
SIZES = {
    "opt-125m": dict(
        hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12, vocab_size=50272
    ),
    "tiny": dict(hidden_size=64, num_hidden_layers=4, ffn_dim=256, num_attention_heads=4, vocab_size=1024),
}


# ---------------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")


# ---------------------------------------------------------------------------------- counting
class CommCounter:
    """Wraps the torch.distributed collectives (both namespaces: FSDP2 calls ``dist.X``, the
    c10d helpers call their module's own) and adds up the bytes each rank hands them."""

    NAMES = (
        "all_reduce",
        "all_gather_single",
        "all_gather_into_tensor",
        "reduce_scatter_tensor",
        "broadcast",
    )

    def __init__(self) -> None:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        self.calls: dict[str, int] = {}
        self.sent = 0
        self.gathered = 0
        self.active = False
        for name in self.NAMES:
            fn = getattr(c10d, name, None)
            if fn is None:
                continue
            wrapped = self._wrap(name, fn)
            for ns in (dist, c10d):
                if getattr(ns, name, None) is fn:
                    setattr(ns, name, wrapped)

    def _wrap(self, name, fn):
        def counted(*args, **kwargs):
            if self.active:
                self.calls[name] = self.calls.get(name, 0) + 1
                if name in ("all_gather_single", "all_gather_into_tensor"):
                    out, inp = args[0], args[1]
                    self.sent += inp.numel() * inp.element_size()
                    self.gathered += out.numel() * out.element_size()
                else:
                    t = args[0] if args else kwargs.get("tensor")
                    self.sent += t.numel() * t.element_size()
            return fn(*args, **kwargs)

        return counted

    def reset(self) -> None:
        self.calls, self.sent, self.gathered = {}, 0, 0


# ---------------------------------------------------------------------------------- one rank
def _build(size: str, mode: str):
    import torch
    import transformers as tf

    cfg = tf.OPTConfig(
        **SIZES[size], word_embed_proj_dim=SIZES[size]["hidden_size"], max_position_embeddings=2048
    )
    cfg.dropout = cfg.attention_dropout = 0.0
    with torch.device("meta"):
        model = tf.OPTForCausalLM(cfg)
    if mode.startswith("zo-fsdp"):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in model.model.decoder.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    if not mode.startswith("zo-fsdp"):
        model.tie_weights()  # to_empty unties the LM head from the embedding (FSDP2 keeps them shared)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if hasattr(p, "to_local") else p
            if "layer_norm" in name:
                local.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                local.zero_()
            else:
                local.normal_(0.0, 0.02, generator=gen)
    return model, cfg


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    counter = CommCounter()
    # everything imported before the baseline, so it measures the model and the steps only
    import transformers.models.opt.modeling_opt  # noqa: F401
    from torch.distributed.fsdp import fully_shard  # noqa: F401

    import zo_plugins  # noqa: F401

    base = _status_kib("VmRSS")
    _reset_peak()
    model, cfg = _build(args.size, args.mode)
    model.train()
    net = model
    if args.mode in ("zo-ddp", "zo-pairs", "bp-ddp"):
        net = torch.nn.parallel.DistributedDataParallel(model)
    if args.mode == "bp-ddp":

        def hook(state, bucket):  # counts each gradient bucket through the wrapped all_reduce
            buf = bucket.buffer().div_(world)
            return dist.all_reduce(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])

        net.register_comm_hook(None, hook)
        opt = torch.optim.SGD(model.parameters(), lr=1e-6)
    else:
        from zo_plugins import ZOOptimizer

        opt = ZOOptimizer(
            model,
            lr=1e-6,
            eps=1e-3,
            perturbation_parallel=args.mode == "zo-pairs",
            perturbation="in-place" if args.mode == "zo-fsdp-inplace" else "auto",
        )
    model_kib = _status_kib("VmRSS") - base
    data_rank = rank // 2 if args.mode == "zo-pairs" else rank
    gen = torch.Generator().manual_seed(1000 + data_rank)

    def batch():
        ids = torch.randint(2, cfg.vocab_size, (args.batch, args.seq), generator=gen)
        return {"input_ids": ids, "labels": ids}

    def step() -> None:
        b = batch()
        if args.mode == "bp-ddp":
            opt.zero_grad(set_to_none=True)
            net(**b).loss.backward()
            opt.step()
        else:
            opt.step(lambda: net(**b).loss)

    step()  # warm-up (lazy inits, first allocations)
    dist.barrier()
    counter.reset()
    counter.active = True
    times, cpu = [], []
    for _ in range(args.steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    counter.active = False
    peak_kib = _status_kib("VmHWM") - base
    mine = {
        "rank": rank,
        "step_s": sum(times) / len(times),
        "cpu_s": sum(cpu) / len(cpu),
        "bytes_per_step": counter.sent / args.steps,
        "gathered_per_step": counter.gathered / args.steps,
        "calls_per_step": {k: v / args.steps for k, v in counter.calls.items()},
        "model_mib": model_kib / 1024,
        "peak_mib": peak_kib / 1024,
        "base_mib": base / 1024,
    }
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        n_params = sum(p.numel() for p in model.parameters())
        batches = world // 2 if args.mode == "zo-pairs" else world
        slowest = max(r["step_s"] for r in everyone)
        busiest = max(r["cpu_s"] for r in everyone)
        out = {
            "mode": args.mode,
            "world": world,
            "params": n_params,
            "gradient_mib": n_params * 4 / 2**20,
            "global_batch": batches * args.batch,
            "step_s": slowest,
            "samples_per_s": batches * args.batch / slowest,
            "cpu_s": busiest,
            "samples_per_cpu_s": batches * args.batch / sum(r["cpu_s"] for r in everyone),
            "samples_per_s_dedicated": batches * args.batch / busiest,
            "ranks": everyone,
        }
        Path(args.out).write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------- driver
def run_one(mode: str, world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(world),
            "--master_port",
            str(_free_port()),
            str(Path(__file__).resolve()),
            "--worker",
            "--mode",
            mode,
            "--size",
            args.size,
            "--steps",
            str(args.steps),
            "--batch",
            str(args.batch),
            "--seq",
            str(args.seq),
            "--out",
            str(out),
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", TOKENIZERS_PARALLELISM="false")
        if args.malloc_mmap_threshold:
            # glibc raises its mmap threshold as large blocks are freed, after which FSDP's per-layer
            # gather buffers (27 MiB here) come from the heap and stay resident when freed: measured
            # +560 MiB of RSS over a 2-rank FSDP2 forward (VmRSS 988 vs 480 MiB at the last layer).
            # A fixed threshold returns them to the system, so RSS measures the program, not the heap.
            env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        t0 = time.time()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode != 0:
            raise RuntimeError(f"{mode} x{world} failed:\n{proc.stderr[-4000:]}")
        res = json.loads(out.read_text())
        res["launch_s"] = time.time() - t0
        return res


def _free_port() -> int:
    import socket as s

    with s.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _machine() -> dict:
    import torch

    return {
        "host": socket.gethostname(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load_avg_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def table(report: dict) -> str:
    rows = [
        f"{'mode':<15} {'procs':>5} {'step s':>7} {'cpu s':>6} {'samples/s':>9} {'ded. s/s':>8} {'bytes/step/rank':>16} "
        f"{'gathered/step':>14} {'model MiB/rank':>15} {'peak MiB/rank':>14}"
    ]
    for r in report["runs"]:
        ranks = r["ranks"]
        rows.append(
            f"{r['mode']:<15} {r['world']:>5} {r['step_s']:>7.2f} {r['cpu_s']:>6.2f} {r['samples_per_s']:>9.2f} "
            f"{r['samples_per_s_dedicated']:>8.2f} "
            f"{_fmt_bytes(max(x['bytes_per_step'] for x in ranks)):>16} "
            f"{_fmt_bytes(max(x['gathered_per_step'] for x in ranks)):>14} "
            f"{max(x['model_mib'] for x in ranks):>15.0f} {max(x['peak_mib'] for x in ranks):>14.0f}"
        )
    return "\n".join(rows)


def _fmt_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}"
    return f"{n:.1f} GiB"


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    colors = {
        "zo-ddp": "#1f77b4",
        "zo-pairs": "#2ca02c",
        "zo-fsdp": "#ff7f0e",
        "zo-fsdp-inplace": "#d62728",
        "bp-ddp": "#7f7f7f",
    }
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    width = 0.16
    for i, mode in enumerate(MODES):
        mine = {r["world"]: r for r in runs if r["mode"] == mode}
        xs = [w for w in WORLDS if w in mine]
        pos = [WORLDS.index(w) + (i - (len(MODES) - 1) / 2) * width for w in xs]
        kw = dict(width=width, color=colors[mode], label=mode)
        axes[0].bar(pos, [max(x["peak_mib"] for x in mine[w]["ranks"]) for w in xs], **kw)
        axes[0].bar(
            pos,
            [max(x["model_mib"] for x in mine[w]["ranks"]) for w in xs],
            width=width,
            color="none",
            edgecolor="black",
            hatch="//",
        )
        axes[1].bar(pos, [mine[w]["samples_per_s_dedicated"] for w in xs], **kw)
        axes[1].plot(pos, [mine[w]["samples_per_s"] for w in xs], "k_", markersize=12, mew=2)
        sent = [max(x["bytes_per_step"] for x in mine[w]["ranks"]) for w in xs]
        axes[2].bar(pos, [max(b, 1e-9) for b in sent], **kw)
        for x, b in zip(pos, sent):
            axes[2].text(x, max(b, 1.5), _fmt_bytes(b), rotation=90, ha="center", va="bottom", fontsize=7)
    titles = (
        "peak memory per rank over the interpreter (MiB)\nhatched: the model's share after building it",
        "samples / s with one core per rank (bars: from CPU time)\nblack: wall clock on this shared 2-core machine",
        "bytes handed to collectives per step and rank\n(payload, log scale; FSDP also receives 2x its gathers)",
    )
    for ax, title in zip(axes, titles):
        ax.set_xticks(range(len(WORLDS)), [f"{w} proc" for w in WORLDS])
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[2].set_yscale("log")
    axes[2].set_ylim(1, 1e11)
    fig.legend(*axes[1].get_legend_handles_labels(), loc="lower center", ncol=len(MODES), fontsize=8)
    m = report["machine"]
    fig.suptitle(
        f"zo_plugins scaling on CPU (gloo), {report['size']} shape, a batch of {report['batch']} x {report['seq']} "
        f"tokens per rank (per pair for zo-pairs) -- {m['host']}, {m['cores']} cores, {m['date']}",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--mode", choices=MODES)
    ap.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    ap.add_argument("--worlds", nargs="+", type=int, default=list(WORLDS))
    ap.add_argument("--size", choices=tuple(SIZES), default="opt-125m")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=1 << 20,
        help="MALLOC_MMAP_THRESHOLD_ for the ranks (bytes; 0: glibc's dynamic default)",
    )
    ap.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--png", type=Path, default=ROOT / "docs" / "img" / "scaling.png")
    ap.add_argument("--plot", type=Path, help="redraw the PNG from a JSON report and exit")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    if args.plot:
        report = json.loads(args.plot.read_text())
        print(table(report))
        plot(report, args.png)
        return
    report = {
        "command": " ".join(["python", "benchmarks/scaling.py", *sys.argv[1:]]),
        "machine": _machine(),
        "size": args.size,
        "batch": args.batch,
        "seq": args.seq,
        "steps": args.steps,
        "malloc_mmap_threshold": args.malloc_mmap_threshold,
        "runs": [],
    }
    for mode in args.modes:
        for world in args.worlds:
            if mode == "zo-pairs" and world % 2:
                continue
            print(f"{mode} x{world} ...", flush=True)
            report["runs"].append(run_one(mode, world, args))
            print(table({"runs": report["runs"][-1:]}).splitlines()[-1], flush=True)
    report["machine"]["load_avg_at_end"] = os.getloadavg()
    args.output.mkdir(parents=True, exist_ok=True)
    suffix = "" if args.size == "opt-125m" else f"-{args.size}"
    path = args.output / f"scaling-{socket.gethostname()}{suffix}.json"
    path.write_text(json.dumps(report, indent=2))
    print(table(report))
    print(f"wrote {path}")
    if args.size == "opt-125m" or args.png != ap.get_default("png"):
        plot(report, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
