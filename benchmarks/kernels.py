"""Fused Triton passes vs the PyTorch passes: correctness first, then bytes moved, achieved
bandwidth against the device's peak, and the time of a ZO step against two forwards, with each
backend, in place and out of place.

    python benchmarks/kernels.py --quick                       # ~3-5 minutes: fits a 15-minute GPU lease
    python benchmarks/kernels.py                               # H100: ~10 minutes
    TRITON_INTERPRET=1 python benchmarks/kernels.py --cpu-smoke  # code paths on CPU, no figures

Needs a CUDA GPU.  Before timing anything it checks the kernels on this GPU (Rademacher passes
bit for bit against the PyTorch passes over odd sizes, an odd storage offset and several tensors
per launch; Gaussian within the ulp bound of the Philox reference) and exits 1 without timings
if one disagrees.  Every pass reads and writes each trainable element once, so its minimum
traffic is 2 x numel x element size (plus 8 / 16 bytes of float32 state for momentum / Adam);
"GB/s" is that minimum over the measured time (for the PyTorch passes, which move more bytes
through chunk buffers, it is an effective figure).  Peak: the datasheet HBM bandwidth of known
GPUs (or --peak-gbs) and the measured device-to-device ``copy_`` bandwidth.  Gaussian passes run
the Philox stream on both backends (what ``gaussian_stream='auto'`` picks on CUDA).  Results are
printed and appended to benchmarks/results/kernels.csv with the machine and GPU names.  Ratios
measured in one run compare; absolute times drift run to run.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
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
from zo_plugins.core.noise import PHILOX_GAUSSIAN, tensor_key  # noqa: E402
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
GAUSSIAN_ULP = 8
"""The Triton-vs-reference bound of Philox-Gaussian directions in float32 ulps (docs/triton.md)."""
Z_ULP = 2.0**-21  # float32 ulp of the largest Box-Muller normal (|z| < 8)


def datasheet_peak(name: str) -> float | None:
    for k in sorted(DATASHEET_GBS, key=len, reverse=True):
        if k in name:
            return DATASHEET_GBS[k]
    return None


def torch_stream(dist: str) -> str:
    """The PyTorch passes' name of the stream the kernels draw."""
    return PHILOX_GAUSSIAN if dist == "gaussian" else dist


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


def make_specs(
    sizes: list[int], dtype: torch.dtype, device: torch.device, offset: int = 0
) -> list[ParamSpec]:
    g = torch.Generator(device=device).manual_seed(0)
    out = []
    for i, n in enumerate(sizes):
        p = (torch.randn(n + offset, generator=g, device=device) * 0.02).to(dtype)[offset:]
        out.append(ParamSpec(p, f"p{i}", tensor_key(f"p{i}")))
    return out


# --------------------------------------------------------------------------- correctness
def _differ(a: torch.Tensor, b: torch.Tensor) -> str | None:
    a, b = a.reshape(-1), b.reshape(-1)
    bad = (
        (
            a.view(torch.int16 if a.element_size() == 2 else torch.int32)
            != b.view(torch.int16 if b.element_size() == 2 else torch.int32)
        )
        .nonzero()
        .reshape(-1)
    )
    if bad.numel():
        i = bad[:3].tolist()
        return (
            f"{bad.numel()} of {a.numel()} elements differ, first at {i}: {a[i].tolist()} vs {b[i].tolist()}"
        )
    return None


def correctness(device: torch.device, big: int) -> list[str]:
    """Every Triton pass against the PyTorch pass on this device: Rademacher bit for bit, Gaussian
    (Philox stream on both) within the ulp bound.  Returns the failures."""
    from zo_plugins.core.updates import init_state, rule_update_
    from zo_plugins.kernels import passes as kp
    from zo_plugins.kernels.rules import triton_rule_update_foreach_

    failures = []
    sizes = [1, 127, 4097, big + 3]
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for dist in ("rademacher", "gaussian"):
            a = make_specs(sizes, dtype, device) + make_specs([1001], dtype, device, offset=1)
            b = [ParamSpec(s.param.clone(), s.name, s.key) for s in a]
            what = f"{dtype} {dist}"

            def check(label, xs, ys, coeff_sum):
                for x, y in zip(xs, ys):
                    if dist == "rademacher":
                        msg = _differ(x, y)
                    else:
                        tol = coeff_sum * GAUSSIAN_ULP * Z_ULP + 2 * 2**-23 * y.float().abs().max().item()
                        rtol = {torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
                        close = torch.isclose(x.float(), y.float(), rtol=rtol, atol=tol)
                        msg = None if close.all() else f"{int((~close).sum())} elements beyond atol {tol:.2g}"
                    if msg:
                        failures.append(f"{label} {what} ({x.numel()} elements): {msg}")

            def sync():  # each pass starts from the same weights (Gaussian results differ by ulps)
                for x, y in zip(a, b):
                    y.param.copy_(x.param)

            kw = dict(chunk_size=1 << 20)
            terms = [(S1, EPS), (S2, -2 * EPS)]
            kp.triton_perturb_(a, terms, distribution=dist)
            torch_passes.perturb_(b, terms, distribution=torch_stream(dist), **kw)
            check("perturb", [s.param for s in a], [s.param for s in b], 3 * EPS)
            ca = kp.triton_perturbed_copies(a, [(S1, EPS)], distribution=dist)
            cb = [
                torch_passes.perturbed_copy(s, [(S1, EPS)], distribution=torch_stream(dist), **kw) for s in b
            ]
            check("perturbed copy", ca, cb, EPS)
            rs = None if dtype == torch.float32 else 7
            sync()
            upd = dict(restore=[(S2, 2 * EPS)], update=[(S2, -1e-4)], decay=1e-3, round_seed=rs)
            kp.triton_update_foreach_(a, distribution=dist, **upd)
            for s in b:
                torch_passes.update_(s, distribution=torch_stream(dist), **upd, **kw)
            check("restore+update", [s.param for s in a], [s.param for s in b], 3 * EPS)
            sync()
            sa = [init_state("momentum", s.param) for s in a]
            sb = [init_state("momentum", s.param) for s in b]
            rk = dict(rule="momentum", restore=[], grads=[(S1, 0.5)], lr=1e-3, weight_decay=0.1, momentum=0.9)
            triton_rule_update_foreach_(a, states=sa, steps=[1] * len(a), distribution=dist, **rk)
            for s, st in zip(b, sb):
                rule_update_(s, state=st, adam_step=1, distribution=torch_stream(dist), **rk, **kw)
            check("momentum", [s.param for s in a], [s.param for s in b], 0.5e-3)
            check(
                "momentum state", [s["momentum_buffer"] for s in sa], [s["momentum_buffer"] for s in sb], 0.5
            )
    return failures


def stream_check(device, rows, n: int) -> list[str]:
    """Directions materialised by the kernels vs the reference: Rademacher bit for bit, Gaussian
    within GAUSSIAN_ULP (and the measured maximum recorded)."""
    from zo_plugins.kernels import reference as ref
    from zo_plugins.kernels.passes import triton_direction

    def ulps(a, b):
        ia = a.view(torch.int32).long()
        ib = b.view(torch.int32).long()
        ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
        ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
        return (ia - ib).abs()

    failures = []
    got = triton_direction(n, distribution="gaussian", seed=S1, key=S2, device=device)
    want = ref.direction(n, distribution="gaussian", seed=S1, key=S2, device=device)
    u = ulps(got, want)
    r_got = triton_direction(n, distribution="rademacher", seed=S1, key=S2, offset=77, device=device)
    r_want = ref.direction(n, distribution="rademacher", seed=S1, key=S2, offset=77, device=device)
    exact = torch.equal(r_got, r_want)
    print(
        f"  gaussian triton vs torch reference on {device.type}: max {int(u.max())} ulp, "
        f"{(u > 0).float().mean().item():.2%} differ, max |diff| {(got - want).abs().max().item():.2e}; "
        f"rademacher bit-identical: {exact}"
    )
    if int(u.max()) > GAUSSIAN_ULP:
        failures.append(f"gaussian directions differ by {int(u.max())} > {GAUSSIAN_ULP} ulp")
    if not exact:
        failures.append("rademacher directions are not bit-identical to the reference")
    rows.append(dict(kind="stream", case=f"gaussian max ulp over {n}", backend="triton", gbs=int(u.max())))
    rows.append(
        dict(
            kind="stream",
            case=f"gaussian share differing over {n}",
            backend="triton",
            gbs=round((u > 0).float().mean().item(), 4),
        )
    )
    return failures


# --------------------------------------------------------------------------- passes
def pass_table(args, timer, device, peak_gbs, copy_gbs, rows) -> None:
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
                tkw = dict(distribution=torch_stream(dist), chunk_size=args.chunk_size)
                kkw = dict(distribution=dist)
                upd = dict(restore=[(S1, EPS)], update=[(S1, -LR * 3.0)], decay=LR * 0.1)
                rs = 7 if dtype != torch.float32 else None
                states = {r: [init_state(r, s.param) for s in specs] for r in ("momentum", "adam")}

                def rule_cases(rule):
                    rk = dict(
                        rule=rule,
                        restore=[(S1, EPS)],
                        grads=[(S1, 3.0)],
                        lr=LR,
                        weight_decay=0.1,
                        round_seed=rs,
                    )
                    return (
                        lambda: [
                            rule_update_(s, state=st, adam_step=1, **rk, **tkw)
                            for s, st in zip(specs, states[rule])
                        ],
                        lambda: triton_rule_update_foreach_(
                            specs, states=states[rule], steps=[1] * len(specs), **rk, **kkw
                        ),
                    )

                cases = {
                    "perturb +eps": (
                        lambda: torch_passes.perturb_(specs, [(S1, EPS)], **tkw),
                        lambda: kp.triton_perturb_(specs, [(S1, EPS)], **kkw),
                    ),
                    "flip -2eps": (
                        lambda: torch_passes.perturb_(specs, [(S1, -2 * EPS)], **tkw),
                        lambda: kp.triton_perturb_(specs, [(S1, -2 * EPS)], **kkw),
                    ),
                    "restore+update": (
                        lambda: [torch_passes.update_(s, round_seed=rs, **upd, **tkw) for s in specs],
                        lambda: kp.triton_update_foreach_(specs, round_seed=rs, **upd, **kkw),
                    ),
                    "perturbed copy": (
                        lambda: [torch_passes.perturbed_copy(s, [(S1, EPS)], **tkw) for s in specs],
                        lambda: kp.triton_perturbed_copies(specs, [(S1, EPS)], **kkw),
                    ),
                    "momentum update": rule_cases("momentum"),
                    "adam update": rule_cases("adam"),
                }
                state_bytes = {"momentum update": 8, "adam update": 16}  # float32 state read + written
                for name, (torch_fn, triton_fn) in cases.items():
                    case_bytes = nbytes + state_bytes.get(name, 0) * sum(sizes)
                    for backend, fn in (("torch", torch_fn), ("triton", triton_fn)):
                        if backend == "torch" and args.skip_torch:
                            continue
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
                                pct_copy=round(100 * gbs / copy_gbs, 1),
                            )
                        )
                        print(
                            f"  {name:15s} {dist:10s} {layout:12s} {str(dtype)[6:]:9s} {backend:6s} "
                            f"{ms:9.3f} ms {gbs:8.0f} GB/s {rows[-1]['pct_peak']:>5}% of peak "
                            f"{rows[-1]['pct_copy']:>5}% of copy_"
                        )


# --------------------------------------------------------------------------- steps
class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 4 * d)
        self.down = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def step_table(args, timer, device, rows) -> None:
    from zo_plugins import ZOOptimizer
    from zo_plugins.kernels import passes as kp

    torch.manual_seed(0)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = nn.Sequential(*[Block(args.hidden) for _ in range(args.layers)]).to(device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    x = torch.randn(args.batch, args.seq, args.hidden, device=device, dtype=dtype)
    specs = [ParamSpec(p, n, tensor_key(n)) for n, p in model.named_parameters()]
    dist = args.distribution

    @torch.no_grad()
    def loss():
        return model(x).float().pow(2).mean()

    def two_forwards():
        loss()
        loss()

    def zo_step(perturb, update, stream):
        """In-place MeZO step from the passes alone: +eps, fwd, -2eps, fwd, restore+update."""

        def run():
            perturb(specs, [(S1, EPS)], distribution=stream, chunk_size=args.chunk_size)
            lp = loss()
            perturb(specs, [(S1, -2 * EPS)], distribution=stream, chunk_size=args.chunk_size)
            lm = loss()
            update(float((lp - lm) / (2 * EPS)))

        return run

    def torch_update(g):
        for s in specs:
            torch_passes.update_(
                s,
                restore=[(S1, EPS)],
                update=[(S1, -LR * g)],
                decay=LR * WD,
                distribution=torch_stream(dist),
                chunk_size=args.chunk_size,
                round_seed=3,
            )

    def triton_update(g):
        kp.triton_update_foreach_(
            specs, restore=[(S1, EPS)], update=[(S1, -LR * g)], decay=LR * WD, distribution=dist, round_seed=3
        )

    base = timer(two_forwards)
    print(f"  model: {n_params / 1e9:.2f}B params {str(dtype)[6:]}, batch {args.batch} x {args.seq} tokens")
    print(f"  two forwards {base:9.2f} ms")
    tag = f"{n_params / 1e9:.2f}B b{args.batch}"
    rows.append(
        dict(kind="step", case=f"two forwards {tag}", dtype=str(dtype)[6:], backend="", ms=round(base, 3))
    )

    def record(what, backend, ms):
        print(f"  ZO step {what:24s} {backend:6s} {ms:9.2f} ms = {ms / base:.3f} x two forwards")
        rows.append(
            dict(
                kind="step",
                case=f"ZO step {what} {tag}",
                dtype=str(dtype)[6:],
                backend=backend,
                ms=round(ms, 3),
                ratio_two_forwards=round(ms / base, 4),
            )
        )

    record(
        "passes in-place", "torch", timer(zo_step(torch_passes.perturb_, torch_update, torch_stream(dist)))
    )
    record("passes in-place", "triton", timer(zo_step(kp.triton_perturb_, triton_update, dist)))
    # the optimizer as users run it (bf16 weights: stochastic rounding); out of place is the
    # perturbed copy handed to each module by a forward pre-hook
    for perturbation in ("in-place", "out-of-place"):
        for backend in ("torch", "triton"):
            opt = ZOOptimizer(
                model,
                lr=LR,
                eps=EPS,
                backend=backend,
                perturbation=perturbation,
                distribution=dist,
                stochastic_rounding=True,
            )
            record(f"ZOOptimizer {perturbation}", backend, timer(lambda: opt.step(loss)))
            opt.close()


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
    ap.add_argument(
        "--quick",
        action="store_true",
        help="--numel 67108864 --layers 8 --reps 5 --small-count 128: a 15-minute GPU lease",
    )
    ap.add_argument("--skip-torch", action="store_true", help="time the Triton passes only")
    ap.add_argument("--peak-gbs", type=float, default=None, help="override the datasheet bandwidth")
    ap.add_argument("--csv", default=str(Path(__file__).parent / "results" / "kernels.csv"))
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny sizes on CPU under TRITON_INTERPRET=1")
    args = ap.parse_args(argv)
    if args.quick:
        args.numel, args.layers, args.reps, args.small_count = 1 << 26, 8, 5, 128

    if args.cpu_smoke:
        if os.environ.get("TRITON_INTERPRET") != "1":
            print("--cpu-smoke needs TRITON_INTERPRET=1 in the environment.", file=sys.stderr)
            return 2
        device = torch.device("cpu")
        args.numel, args.small_count, args.hidden, args.layers, args.batch, args.seq = 1 << 12, 2, 32, 2, 2, 8
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
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter smoke)"
    print("correctness (Triton vs PyTorch passes on this device):")
    failures = correctness(device, big=1 << 12 if args.cpu_smoke else 1 << 22)
    rows: list[dict] = []
    print("streams:")
    failures += stream_check(device, rows, 1 << 24 if device.type == "cuda" else 1 << 12)
    if failures:
        print(
            "FAILED -- no timings from kernels that disagree:\n  " + "\n  ".join(failures[:20]),
            file=sys.stderr,
        )
        return 1
    print(f"  all passes agree ({time.perf_counter() - t0:.0f} s including compiles)")
    timer = Timer(device, args.reps, 1 if args.cpu_smoke else 2)
    sheet = args.peak_gbs or datasheet_peak(name)
    copy_gbs = copy_bandwidth(timer, max(args.numel, 1 << 20) // 2, device)
    peak = sheet or copy_gbs
    print(f"{name}: datasheet {sheet or 'unknown'} GB/s, measured copy_ {copy_gbs:.0f} GB/s; % of {peak:.0f}")
    print("passes (bytes = 2 x numel x element size, + float32 state):")
    pass_table(args, timer, device, peak, copy_gbs, rows)
    print("ZO step vs two forwards:")
    step_table(args, timer, device, rows)
    print(f"total {time.perf_counter() - t0:.0f} s")
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
            "pct_copy",
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
