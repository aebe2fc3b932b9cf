"""Fused Triton passes vs the PyTorch passes: bytes moved, achieved bandwidth against the
device's peak, and the time of a ZO step against two forwards, with each backend.

    python benchmarks/kernels.py                      # H100: ~2 minutes
    python benchmarks/kernels.py --numel 67108864 --layers 8   # smaller
    TRITON_INTERPRET=1 python benchmarks/kernels.py --cpu-smoke  # code-path check, no figures

Needs a CUDA GPU.  Every pass reads and writes each trainable element once, so its minimum
traffic is 2 x numel x element size; "GB/s" below is that minimum over the measured time
(for the PyTorch passes, which move more bytes through chunk buffers, it is an effective
figure).  Peak: the datasheet HBM bandwidth of known GPUs (or --peak-gbs) and the measured
device-to-device copy bandwidth.  Results are printed and appended to
benchmarks/results/kernels.csv with the machine and GPU names.  Ratios measured in one run
compare; absolute times drift run to run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import math
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zo_plugins.core import passes as torch_passes  # noqa: E402
from zo_plugins.core.noise import tensor_key  # noqa: E402
from zo_plugins.core.passes import ParamSpec  # noqa: E402

DATASHEET_GBS = {  # HBM bandwidth, GB/s (1e9 bytes/s)
    "H100 NVL": 3900,
    "H100 PCIe": 2000,
    "H100": 3350,  # SXM5 (H100 80GB HBM3)
    "H200": 4800,
    "A100-SXM4-80GB": 2039,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "A100 80GB PCIe": 1935,
    "L40S": 864,
    "A10G": 600,
}
EPS, LR, WD = 1e-3, 1e-6, 0.0
S1, S2 = 0x0123_4567_89AB_CDEF, 0x0FED_CBA9_8765_4321


def datasheet_peak(name: str) -> float | None:
    for k in sorted(DATASHEET_GBS, key=len, reverse=True):
        if k in name:
            return DATASHEET_GBS[k]
    return None


class Timer:
    """Median wall time of ``fn`` in ms: CUDA events on GPU, perf_counter on CPU (smoke)."""

    def __init__(self, device: torch.device, reps: int, warmup: int) -> None:
        self.device, self.reps, self.warmup = device, reps, warmup

    def __call__(self, fn) -> float:
        for _ in range(self.warmup):
            fn()
        times = []
        for _ in range(self.reps):
            if self.device.type == "cuda":
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                b.synchronize()
                times.append(a.elapsed_time(b))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def make_specs(sizes: list[int], dtype: torch.dtype, device: torch.device) -> list[ParamSpec]:
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for i, n in enumerate(sizes):
        p = (torch.randn(n, generator=g, device=device) * 0.02).to(dtype)
        out.append(ParamSpec(p, f"p{i}", tensor_key(f"p{i}")))
    return out


def pass_table(args, timer, device, peak_gbs, rows) -> None:
    from zo_plugins.core.updates import init_state, rule_update_
    from zo_plugins.kernels import passes as kp
    from zo_plugins.kernels.rules import triton_rule_update_foreach_

    layouts = {
        "1 tensor": [args.numel],
        f"{args.small_count} tensors": [args.numel // args.small_count] * args.small_count,
    }
    for dtype in (torch.float32, torch.bfloat16):
        for layout, sizes in layouts.items():
            specs = make_specs(sizes, dtype, device)
            nbytes = 2 * sum(sizes) * specs[0].param.element_size()
            for dist in ("gaussian", "rademacher"):
                kw = dict(distribution=dist, chunk_size=args.chunk_size)
                upd = dict(restore=[(S1, EPS)], update=[(S1, -LR * 3.0)], decay=LR * 0.1, **kw)
                rs = 7 if dtype != torch.float32 else None
                states = {r: [init_state(r, s.param) for s in specs] for r in ("momentum", "adam")}

                def rule_cases(rule):
                    rk = dict(rule=rule, restore=[(S1, EPS)], grads=[(S1, 3.0)], lr=LR, weight_decay=0.1,
                              round_seed=rs, **kw)
                    return (
                        lambda: [rule_update_(s, state=st, adam_step=1, **rk) for s, st in zip(specs, states[rule])],
                        lambda: triton_rule_update_foreach_(specs, states=states[rule], steps=[1] * len(specs), **rk),
                    )

                cases = {
                    "perturb +eps": (
                        lambda: torch_passes.perturb_(specs, [(S1, EPS)], **kw),
                        lambda: kp.triton_perturb_(specs, [(S1, EPS)], **kw),
                    ),
                    "flip -2eps": (
                        lambda: torch_passes.perturb_(specs, [(S1, -2 * EPS)], **kw),
                        lambda: kp.triton_perturb_(specs, [(S1, -2 * EPS)], **kw),
                    ),
                    "restore+update": (
                        lambda: [torch_passes.update_(s, round_seed=rs, **upd) for s in specs],
                        lambda: kp.triton_update_foreach_(specs, round_seed=rs, **upd),
                    ),
                    "perturbed copy": (
                        lambda: [torch_passes.perturbed_copy(s, [(S1, EPS)], **kw) for s in specs],
                        lambda: kp.triton_perturbed_copies(specs, [(S1, EPS)], **kw),
                    ),
                    "momentum update": rule_cases("momentum"),
                    "adam update": rule_cases("adam"),
                }
                # float32 state read and written: 8 bytes per element (momentum), 16 (Adam)
                state_bytes = {"momentum update": 8, "adam update": 16}
                for name, (torch_fn, triton_fn) in cases.items():
                    case_bytes = nbytes + state_bytes.get(name, 0) * sum(sizes)
                    for backend, fn in (("torch", torch_fn), ("triton", triton_fn)):
                        ms = timer(fn)
                        gbs = case_bytes / ms / 1e6
                        rows.append(
                            dict(
                                kind="pass",
                                case=f"{name} {dist} {layout}",
                                dtype=str(dtype).split(".")[-1],
                                backend=backend,
                                ms=round(ms, 4),
                                bytes=case_bytes,
                                gbs=round(gbs, 1),
                                pct_peak=round(100 * gbs / peak_gbs, 1) if peak_gbs else "",
                            )
                        )
                        print(
                            f"  {name:15s} {dist:10s} {layout:12s} {str(dtype)[6:]:9s} {backend:6s} "
                            f"{ms:9.3f} ms {gbs:8.0f} GB/s {rows[-1]['pct_peak']}%"
                        )


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def step_table(args, timer, device, rows) -> None:
    from zo_plugins.kernels import passes as kp

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = nn.Sequential(*[Block(args.hidden) for _ in range(args.layers)]).to(device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    specs = [ParamSpec(p, n, tensor_key(n)) for n, p in model.named_parameters()]

    @torch.no_grad()
    def loss():
        return model(x).float().pow(2).mean()

    def two_forwards():
        loss()
        loss()

    def zo_step(perturb, update):
        """In-place MeZO step: +eps, fwd, -2eps, fwd, restore+update in one pass."""

        def run():
            perturb(specs, [(S1, EPS)], distribution=args.distribution, chunk_size=args.chunk_size)
            lp = loss()
            perturb(specs, [(S1, -2 * EPS)], distribution=args.distribution, chunk_size=args.chunk_size)
            lm = loss()
            g = float((lp - lm) / (2 * EPS))
            update(g)

        return run

    def torch_update(g):
        for s in specs:
            torch_passes.update_(
                s,
                restore=[(S1, EPS)],
                update=[(S1, -LR * g)],
                decay=LR * WD,
                distribution=args.distribution,
                chunk_size=args.chunk_size,
                round_seed=3,
            )

    def triton_update(g):
        kp.triton_update_foreach_(
            specs,
            restore=[(S1, EPS)],
            update=[(S1, -LR * g)],
            decay=LR * WD,
            distribution=args.distribution,
            round_seed=3,
        )

    base = timer(two_forwards)
    print(f"  model: {n_params / 1e9:.2f}B params {str(dtype)[6:]}, batch {args.batch} x {args.seq} tokens")
    print(f"  two forwards {base:9.2f} ms")
    rows.append(
        dict(
            kind="step",
            case=f"two forwards {n_params / 1e9:.2f}B",
            dtype=str(dtype)[6:],
            backend="",
            ms=round(base, 3),
        )
    )
    for backend, fn in (
        ("torch", zo_step(torch_passes.perturb_, torch_update)),
        ("triton", zo_step(kp.triton_perturb_, triton_update)),
    ):
        ms = timer(fn)
        print(f"  ZO step {backend:6s} {ms:9.2f} ms = {ms / base:.3f} x two forwards")
        rows.append(
            dict(
                kind="step",
                case=f"ZO step {n_params / 1e9:.2f}B b{args.batch}",
                dtype=str(dtype)[6:],
                backend=backend,
                ms=round(ms, 3),
                ratio_two_forwards=round(ms / base, 4),
            )
        )


def stream_check(device, rows, n: int) -> None:
    from zo_plugins.kernels import reference as ref
    from zo_plugins.kernels.passes import triton_direction

    def ulps(a, b):
        ia = a.view(torch.int32).long()
        ib = b.view(torch.int32).long()
        ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
        ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
        return (ia - ib).abs()

    got = triton_direction(n, distribution="gaussian", seed=S1, key=S2, device=device)
    want = ref.direction(n, distribution="gaussian", seed=S1, key=S2, device=device)
    u = ulps(got, want)
    r_got = triton_direction(n, distribution="rademacher", seed=S1, key=S2, device=device)
    r_want = ref.direction(n, distribution="rademacher", seed=S1, key=S2, device=device)
    print(
        f"  gaussian triton vs torch reference on {device.type}: max {int(u.max())} ulp, "
        f"{(u > 0).float().mean().item():.1%} differ, max |diff| {(got - want).abs().max().item():.2e}; "
        f"rademacher bit-identical: {torch.equal(r_got, r_want)}"
    )
    rows.append(
        dict(
            kind="stream",
            case=f"gaussian max ulp over {n}",
            backend="triton",
            ms="",
            gbs=int(u.max()),
            pct_peak="",
            dtype="float32",
        )
    )


def copy_bandwidth(timer: Timer, n: int, device: torch.device) -> float:
    """Achieved GB/s of a device-to-device float32 copy (read + write), the practical peak."""
    src = torch.empty(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return 2 * n * 4 / timer(lambda: dst.copy_(src)) / 1e6


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--numel", type=int, default=1 << 28, help="elements per pass table case")
    ap.add_argument("--small-count", type=int, default=512, help="tensors in the many-tensor layout")
    ap.add_argument("--chunk-size", type=int, default=1 << 20, help="chunk of the PyTorch passes")
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=32, help="32 x 8 x 2048^2 = 1.07B parameters")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--distribution", default="gaussian", choices=["gaussian", "rademacher"])
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--peak-gbs", type=float, default=None, help="override the datasheet bandwidth")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "kernels.csv"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)

    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment.", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        args.numel, args.small_count, args.hidden, args.layers, args.batch, args.seq = 1 << 12, 8, 32, 2, 2, 8
        args.reps, args.csv = 1, None
    elif not torch.cuda.is_available():
        print(
            "benchmarks/kernels.py needs a CUDA GPU: none is visible here, so there is nothing to "
            "measure. Run it on a GPU machine (the docs quote its figures), or pass --cpu-smoke "
            "with TRITON_INTERPRET=1 to exercise the code paths without figures.",
            file=sys.stderr,
        )
        return 1
    else:
        device = torch.device("cuda")
    from zo_plugins.kernels import require_triton

    require_triton()
    timer = Timer(device, args.reps, 1 if args.cpu_smoke else 3)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke)"
    sheet = args.peak_gbs or datasheet_peak(name)
    copy_gbs = copy_bandwidth(timer, max(args.numel, 1 << 20) // 2, device)
    peak = sheet or copy_gbs
    print(f"{name}: datasheet {sheet or 'unknown'} GB/s, measured copy_ {copy_gbs:.0f} GB/s; % of {peak:.0f}")
    rows: list[dict] = []
    print("passes (bytes = 2 x numel x element size):")
    pass_table(args, timer, device, peak, rows)
    print("ZO step vs two forwards:")
    step_table(args, timer, device, rows)
    print("streams:")
    stream_check(device, rows, 1 << 24 if device.type == "cuda" else 1 << 12)
    if args.csv:
        path = Path(args.csv)
        path.parent.mkdir(parents=True, exist_ok=True)
        fields = [
            "date",
            "machine",
            "gpu",
            "kind",
            "case",
            "dtype",
            "backend",
            "ms",
            "bytes",
            "gbs",
            "pct_peak",
            "ratio_two_forwards",
            "copy_gbs",
            "datasheet_gbs",
        ]
        new = not path.exists()
        with path.open("a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            if new:
                w.writeheader()
            stamp = dt.datetime.now().isoformat(timespec="seconds")
            for r in rows:
                w.writerow(
                    dict(
                        date=stamp,
                        machine=socket.gethostname(),
                        gpu=name,
                        copy_gbs=round(copy_gbs),
                        datasheet_gbs=sheet or "",
                        **r,
                    )
                )
        print(f"appended {len(rows)} rows to {path}")
    return 0 if all(math.isfinite(float(r["ms"])) for r in rows if r.get("ms") != "") else 1


if __name__ == "__main__":
    raise SystemExit(main())
