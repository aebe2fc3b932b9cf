"""Compile the Triton kernels for GPU targets on a machine without a GPU, and read what the
hardware will run: registers, spills, vector widths, Philox calls, SASS instruction mix.

    python -m zo_plugins.kernels.compile_report                  # the CI grid, sm_80 and sm_90
    python -m zo_plugins.kernels.compile_report --arch 90 --grid full --jobs 2 --json out.json

Every variant is built the way a launch builds it: the launcher's own plan
(``passes._pass_launches``, ``rules._rule_launches``) over CPU tensors of chosen sizes, dtypes,
alignments, masks and terms gives the kernel, its constexprs and its arguments; Triton's own
binder turns them into the specialisation a launch would compile; ``triton.compile`` builds PTX
and a cubin for ``GPUTarget("cuda", arch, 32)`` with the bundled ptxas, and ``cuobjdump`` reads
the cubin's resource usage (registers; local memory = spills, what ``CompiledKernel.n_spills``
reports on a GPU) and its SASS.  Needs ``TRITON_INTERPRET`` unset (the interpreter has nothing
to compile): ``tests/compile`` runs it in a subprocess.

Per variant it reports the register count, spill bytes, the byte widths of the global loads and
stores in the PTX, the PTX's ``mul.hi.u32`` count (Philox: 2 per round, 20 per call, fewer when
rounds with constant inputs fold), and for the straight-line variants (one term, no partial
tiles, no frozen rows) an *estimated ceiling*: the hot-path SASS (outside loops -- the
per-program tensor bisection -- and outside the ``BSSY`` regions of libdevice's never-taken slow
paths, e.g. sinf's Payne-Hanek reduction for |x| > 1e5) weighted by the CUDA C Programming
Guide's per-SM throughputs, against the bytes a pass must move at the HBM bandwidth of a
reference GPU.  It is an issue-slot model -- no latency, occupancy or cache effects -- so it
bounds, it does not predict; ``benchmarks/kernels.py`` measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

__all__ = ["Variant", "REFERENCE_GPUS", "grid", "toolchain_problem", "compile_variant", "main"]

ARCHS = (80, 90)
DTYPES = ("float32", "bfloat16", "float16")
DISTRIBUTIONS = ("rademacher", "gaussian")
PASS_OPS = ("perturb", "copy", "update")
RULE_OPS = ("sign", "momentum", "adam")

REFERENCE_GPUS = {
    # arch: [(name, SMs, boost clock GHz, HBM GB/s)] -- datasheet figures
    90: [("H100 SXM", 132, 1.98, 3350.0), ("H200", 132, 1.98, 4800.0)],
    80: [("A100 SXM 80GB", 108, 1.41, 2039.0)],
}

# Cycles one warp instruction occupies a scheduler (SM quadrant) = 128 / (results per clock per
# SM), from the CUDA C Programming Guide's arithmetic-instruction throughput table.
_FP32 = ("FADD", "FMUL", "FFMA", "FADD32I", "FMUL32I", "FFMA32I")
_SLOW = ("MUFU", "I2F", "F2I", "F2F", "FLO", "POPC", "FRND")  # 16 per SM per clock


def _cycles(op: str, arch: int) -> int:
    if op.startswith(_FP32):
        return 1 if arch >= 90 else 2  # 128 FP32 results per clock per SM on sm_90, 64 on sm_80
    if op.startswith(_SLOW):
        return 8
    if op.startswith(("IMAD", "IADD", "LOP", "SHF", "ISETP", "IMNMX", "LEA", "SGXT", "PRMT", "SEL", "FSEL",
                      "FSETP", "FMNMX", "VIADD", "IABS", "I2FP", "F2FP", "VIMNMX", "PLOP3", "P2R", "R2P")):  # fmt: skip
        return 2  # 64 per SM per clock: integer, compare, select, the sm_86+ ALU conversions
    return 1  # moves, memory issue, branches, uniform-datapath instructions


@dataclass(frozen=True)
class Variant:
    """One launch the launchers can make: which kernel and pass, and every input property that
    changes what they compile."""

    op: str  # perturb | copy | update (pass kernel) | sign | momentum | adam (rule kernel)
    distribution: str
    dtype: str
    K: int = 1  # terms (pass) or directions (rule)
    masked: bool = False  # Sparse MeZO magnitude threshold
    frozen: int = 0  # frozen rows
    stochastic: bool = False  # stochastic rounding (bf16/fp16 updates)
    aligned: bool = True  # 16-byte aligned data (False: a view at an odd storage offset)
    tails: bool = False  # a partial tile (numel not a multiple of the block)
    decay: bool = False  # weight decay (update, rules)
    restore: bool = False  # restore terms (rules)

    @property
    def kernel(self) -> str:
        return "rule" if self.op in RULE_OPS else "pass"

    @property
    def name(self) -> str:
        flags = [
            f"K{self.K}",
            "masked" if self.masked else "",
            f"frozen{self.frozen}" if self.frozen else "",
            "sr" if self.stochastic else "",
            "" if self.aligned else "unaligned",
            "tails" if self.tails else "",
            "decay" if self.decay else "",
            "restore" if self.restore else "",
        ]
        return " ".join([self.op, self.distribution, self.dtype, *[f for f in flags if f]])


def _cells() -> Iterable[tuple[str, str]]:
    for dist in DISTRIBUTIONS:
        for dtype in DTYPES:
            yield dist, dtype


def _heavy(op: str, dist: str, dtype: str) -> Variant:
    """Everything on: two terms, magnitude mask, two frozen ranges, stochastic rounding (half),
    partial tiles, decay, restore terms (rules): the most registers a launch can need."""
    half = dtype != "float32"
    return Variant(op, dist, dtype, K=2, masked=True, frozen=2, stochastic=half, tails=True, decay=True,
                   restore=op in RULE_OPS)  # fmt: skip


def grid(name: str = "ci", archs: Iterable[int] = ARCHS) -> list[tuple[Variant, int]]:
    """(variant, arch) pairs to compile.

    ``ci`` -- a representative grid, since the launchers' full product is ~2000 variants per
    arch.  On sm_90, per distribution, for float32 and bf16: the hot path of each pass and rule
    (one term, aligned, whole tiles), its K = 2..4 siblings (one compiled variant: the term
    loop is a runtime loop), partial tiles, a view at an odd storage offset, and the heaviest
    pass and rule (``_heavy``); for fp16, which differs from bf16 only in its rounding
    constants, the hot perturbation, the stochastic-rounding update and the heaviest pass and
    rule.  On sm_80: the hot perturbation, partial tiles, Adam and the heaviest pass and rule.
    ``full`` -- the product of every input property the launchers read (K in {1, 2})."""
    archs = list(archs)
    out: list[tuple[Variant, int]] = []
    if name == "full":
        for arch in archs:
            out += [(v, arch) for v in _full()]
        return out
    if name != "ci":
        raise ValueError(f"grid={name!r} is not one of ('ci', 'full').")
    for dist, dtype in _cells():
        half = dtype != "float32"
        hot = Variant("perturb", dist, dtype)
        sr_update = Variant("update", dist, dtype, decay=True, stochastic=half)
        if dtype == "float16":
            sm90 = [hot, sr_update, _heavy("update", dist, dtype), _heavy("adam", dist, dtype)]
        else:
            sm90 = [hot, *(replace(hot, K=k) for k in (2, 3, 4)), replace(hot, tails=True),
                    replace(hot, aligned=False, tails=True), Variant("copy", dist, dtype), sr_update,
                    _heavy("update", dist, dtype), *(Variant(r, dist, dtype) for r in RULE_OPS),
                    _heavy("adam", dist, dtype)]  # fmt: skip
        sm80 = [hot, replace(hot, tails=True), Variant("adam", dist, dtype), _heavy("update", dist, dtype),
                _heavy("adam", dist, dtype)]  # fmt: skip
        if dtype == "float16":
            sm80 = [hot]
        out += [(v, 90) for v in sm90 if 90 in archs] + [(v, 80) for v in sm80 if 80 in archs]
    for arch in archs:
        if arch not in ARCHS:
            out += [(Variant("perturb", d, t), arch) for d, t in _cells()]
    return out


def _full() -> list[Variant]:
    out = []
    for dist, dtype in _cells():
        half = dtype != "float32"
        for op in PASS_OPS + RULE_OPS:
            decays = (False,) if op in ("perturb", "copy") else (False, True)
            srs = (False, True) if half and op not in ("perturb", "copy") else (False,)
            restores = (False, True) if op in RULE_OPS else (False,)
            for K in (1, 2):
                for masked in (False, True):
                    for frozen in (0, 2):
                        for aligned in (True, False):
                            for tails in (False, True):
                                for decay in decays:
                                    for sr in srs:
                                        for restore in restores:
                                            out.append(Variant(op, dist, dtype, K, masked, frozen, sr, aligned,
                                                               tails, decay, restore))  # fmt: skip
    return out


# --------------------------------------------------------------------------- building launches
def _tensor(numel: int, dtype, aligned: bool):
    import torch

    cols = 64
    store = torch.zeros(numel + 1, dtype=dtype)
    t = store[1:] if not aligned else torch.zeros(numel, dtype=dtype)
    return t.view(numel // cols, cols)


def build_launch(v: Variant):
    """The ``Launch`` the launcher makes for ``v`` (over CPU tensors: only addresses, sizes and
    dtypes matter for what is compiled)."""
    import torch

    from ..core.passes import ParamSpec
    from . import passes, rules

    dtype = getattr(torch, v.dtype)
    block = passes.cuda_block(v.distribution, dtype)
    numel = 2 * block + (64 if v.tails else 0)
    theta = _tensor(numel, dtype, v.aligned)
    frozen_rows = tuple(range(v.frozen))
    seeds = [(0x1000 + k, 1e-3) for k in range(v.K)]
    if v.kernel == "pass":
        spec = ParamSpec(theta, "w", 0x5EED, frozen_rows=frozen_rows)
        dst = torch.empty_like(theta) if v.op == "copy" else theta
        job = passes._Job(theta, dst, spec.key, passes._frozen_ranges(spec), 0.01 if v.masked else None)
        launches = passes._pass_launches(
            [job],
            seeds,
            distribution=v.distribution,
            decay=1e-3 if v.decay else 0.0,
            round_seed=7 if v.stochastic else None,
        )
    else:
        spec = ParamSpec(theta, "w", 0x5EED, frozen_rows=frozen_rows)
        state = {name: torch.zeros(numel, dtype=torch.float32).view(theta.shape) for name in
                 ("momentum_buffer", "exp_avg", "exp_avg_sq")}  # fmt: skip
        launches = rules._rule_launches(
            [spec],
            rule=v.op,
            restore=[(0x99, 1e-3)] if v.restore else [],
            grads=[(s, 0.5) for s, _ in seeds],
            lr=1e-3,
            weight_decay=0.1 if v.decay else 0.0,
            states=[state],
            steps=[3],
            momentum=0.9,
            betas=(0.9, 0.999),
            adam_eps=1e-8,
            distribution=v.distribution,
            round_seed=7 if v.stochastic else None,
            magnitude_threshold=0.01 if v.masked else None,
            block=None,
        )
    if len(launches) != 1:
        raise AssertionError(f"{v.name}: expected one launch, the launcher made {len(launches)}")
    return launches[0]


# --------------------------------------------------------------------------- toolchain
def toolchain_problem() -> str | None:
    """Why kernels cannot be compiled for a GPU here, or None: triton and its bundled ptxas and
    cuobjdump must be present (a GPU and a CUDA driver are not needed)."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return "TRITON_INTERPRET=1 is set: the interpreter has no kernels to compile (unset it)"
    try:
        import triton  # noqa: F401
        from triton import knobs
        from triton.backends.nvidia.compiler import get_ptxas
    except Exception as exc:  # noqa: BLE001 - a broken install counts as missing
        return f"triton (with its NVIDIA backend) does not import: {type(exc).__name__}: {exc}"
    for tool in (get_ptxas(90), knobs.nvidia.cuobjdump):
        try:
            path = tool.path
        except Exception as exc:  # noqa: BLE001
            return f"a CUDA tool triton bundles is missing: {exc}"
        if not path or not os.path.exists(path):
            return f"a CUDA tool triton bundles is missing: {path!r}"
    return None


def _bind(launch, target):
    """Triton's own specialisation of a launch's arguments, as ``JITFunction.run`` computes it."""
    import torch
    from triton import knobs
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.args, **launch.constexprs, **launch.options)
    kwargs["debug"] = kwargs.get("debug", kernel.debug) or knobs.runtime.debug
    kwargs["instrumentation_mode"] = knobs.compilation.instrumentation_mode
    kwargs["fpsan_homomorphic_casts"] = knobs.compilation.fpsan_homomorphic_casts
    # the device table comes from PyTorch's caching allocator (512-byte aligned)
    table = torch.empty(launch.table.shape, dtype=torch.int64)
    bound, specialization, options = binder(table, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return signature, constexprs, attrs, options


def specialization_key(v: Variant, arch: int) -> str:
    """What Triton would compile for ``v``: two variants with the same key are one kernel."""
    from triton.backends.compiler import GPUTarget

    launch = build_launch(v)
    signature, constexprs, attrs, options = _bind(launch, GPUTarget("cuda", arch, 32))
    return repr((launch.kernel.fn.__name__, signature, sorted(constexprs.items()), attrs, options))


# --------------------------------------------------------------------------- reading the binary
_MEM = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")


def _ptx_accesses(ptx: str) -> dict[str, dict[int, int]]:
    """Global loads and stores by bytes per thread-instruction (vector count x element width);
    ``ld.nc``: read-only loads (libdevice's constant tables), not data."""
    out: dict[str, Counter] = {"ld": Counter(), "st": Counter(), "ld.nc": Counter()}
    for kind, suffix in _MEM.findall(ptx):
        parts = suffix.strip(".").split(".")
        vec = next((int(p[1:]) for p in parts if re.fullmatch(r"v\d", p)), 1)
        bits = next((int(p[1:]) for p in parts if re.fullmatch(r"[bsuf]\d+", p)), 0)
        out["ld.nc" if kind == "ld" and "nc" in parts else kind][vec * bits // 8] += 1
    return {k: dict(sorted(c.items())) for k, c in out.items()}


_SASS_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T\d]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);", re.M)


def _sass_figures(sass: str, arch: int) -> dict[str, Any]:
    ins = [(int(a, 16), op, rest) for a, op, rest in _SASS_LINE.findall(sass)]
    slow, loops = [], []
    for addr, op, rest in ins:
        m = re.search(r"0x([0-9a-f]+)", rest)
        if op == "BSSY" and m:
            slow.append((addr, int(m.group(1), 16)))
        elif op == "BRA" and m and int(m.group(1), 16) < addr:
            loops.append((int(m.group(1), 16), addr + 1))
    # hot path: what a tile runs once -- outside libdevice's slow-path regions and outside
    # loops (the tensor bisection: log2(tensors) steps per program; the term loop for K >= 2)
    hot = [op for addr, op, _ in ins if not any(lo < addr < hi for lo, hi in slow + loops)]
    for lo, hi in slow:  # a region's guard (from BSSY to its first branch) runs every time
        if any(a < lo < b for a, b in slow):
            continue
        for addr, op, _ in ins:
            if lo < addr < hi:
                hot.append(op)
                if op == "BRA":
                    break
    mem = Counter(op for _, op, _ in ins if op.startswith(("LDG", "STG")))
    return dict(
        instructions=len(ins),
        hot_instructions=len(hot),
        hot_cycles=sum(_cycles(op, arch) for op in hot),
        mufu=sum(op.startswith("MUFU") for op in hot),
        memory=dict(sorted(mem.items())),
    )


def _resources(cubin: bytes, cuobjdump: str) -> tuple[int, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run(
            [cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True, check=True
        ).stdout
    m = re.search(r"REG:(\d+).*?LOCAL:(\d+)", text)
    if not m:
        raise RuntimeError(f"cuobjdump printed no resource usage: {text!r}")
    return int(m.group(1)), int(m.group(2))


def _sass(cubin: bytes, cuobjdump: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _bytes_per_element(v: Variant) -> int:
    size = 4 if v.dtype == "float32" else 2
    state = {"momentum": 8, "adam": 16}.get(v.op, 0)  # float32 state read and written
    return 2 * size + state


def _estimate(v: Variant, block: int, sass: dict, arch: int) -> dict[str, float] | None:
    if v.tails or v.K != 1 or v.frozen:
        return None  # two paths, or loops over terms / frozen ranges: the static count is not a tile
    cycles_per_element = 4 * sass["hot_cycles"] / block  # 4 warps run the stream per program
    out = {"cycles_per_element": round(cycles_per_element, 3)}
    for name, sms, ghz, gbs in REFERENCE_GPUS[arch]:
        alu = sms * ghz * 1e9 * 4 / cycles_per_element  # elements per second, 4 schedulers per SM
        hbm = gbs * 1e9 / _bytes_per_element(v)
        out[f"ceiling_pct {name}"] = round(min(100.0, 100.0 * alu / hbm), 1)
    return out


@dataclass
class Compiled:
    variant: dict[str, Any]
    name: str
    arch: int
    constexprs: dict[str, Any]
    n_regs: int
    n_spills: int
    shared: int
    compile_s: float
    ptx: dict[str, Any]
    sass: dict[str, Any]
    estimate: dict[str, float] | None
    same_as: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def compile_variant(v: Variant, arch: int) -> Compiled:
    """Compile ``v`` for ``sm_<arch>`` and read its figures."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    launch = build_launch(v)
    target = GPUTarget("cuda", arch, 32)
    signature, constexprs, attrs, options = _bind(launch, target)
    t0 = time.perf_counter()
    ck = triton.compile(ASTSource(launch.kernel, signature, constexprs, attrs), target=target,
                        options=options.__dict__)  # fmt: skip
    dt = time.perf_counter() - t0
    cuobjdump = knobs.nvidia.cuobjdump.path
    n_regs, n_spills = _resources(ck.asm["cubin"], cuobjdump)
    ptx = ck.asm["ptx"]
    sass = _sass_figures(_sass(ck.asm["cubin"], cuobjdump), arch)
    block = launch.constexprs["BLOCK"]
    return Compiled(
        variant=asdict(v),
        name=v.name,
        arch=arch,
        constexprs=dict(launch.constexprs),
        n_regs=n_regs,
        n_spills=n_spills,
        shared=int(ck.metadata.shared),
        compile_s=round(dt, 3),
        ptx=dict(
            accesses=_ptx_accesses(ptx),
            mul_hi=ptx.count("mul.hi.u32"),
            cvt_rn_half=len(re.findall(r"cvt\.rn\.(?:bf16|f16)", ptx)),
            lines=ptx.count("\n"),
        ),
        sass=sass,
        estimate=_estimate(v, block, sass, arch),
    )


def _compile_item(item: tuple[Variant, int]) -> dict[str, Any]:
    v, arch = item
    try:
        return asdict(compile_variant(v, arch))
    except Exception as exc:  # noqa: BLE001 - reported per variant, the run goes on
        return dict(variant=asdict(v), name=v.name, arch=arch, error=f"{type(exc).__name__}: {exc}")


def run(pairs: list[tuple[Variant, int]], jobs: int = 1) -> dict[str, Any]:
    """Compile every (variant, arch) once per distinct specialisation; variants that specialise
    identically (e.g. K = 2..4: the term loop is a runtime loop) share one compile."""
    import triton

    t0 = time.perf_counter()
    items, same = [], {}
    seen: dict[str, str] = {}
    for v, arch in pairs:
        key = specialization_key(v, arch)
        if key in seen:
            same[(v, arch)] = seen[key]
        else:
            seen[key] = v.name
            items.append((v, arch))
    if jobs > 1:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(_compile_item, items))
    else:
        results = [_compile_item(it) for it in items]
    by = {(r["name"], r["arch"]): r for r in results}
    for (v, arch), first in same.items():
        twin = dict(by[(first, arch)])
        twin.update(name=v.name, same_as=first, compile_s=0.0, variant=asdict(v))
        if twin.get("estimate") is not None:
            twin["estimate"] = _estimate(v, twin["constexprs"]["BLOCK"], twin["sass"], arch)
        results.append(twin)
    return dict(
        triton=triton.__version__,
        archs=sorted({arch for _, arch in pairs}),
        compiles=len(items),
        seconds=round(time.perf_counter() - t0, 1),
        variants=results,
    )


def _table(report: dict[str, Any]) -> str:
    rows = [
        f"{'variant':62s} {'sm':>3s} {'regs':>4s} {'spill':>5s} {'ld B':>6s} {'st B':>6s} {'mulhi':>5s} "
        f"{'hot SASS':>8s} {'cyc/el':>6s} {'ceiling':>14s} {'s':>5s}"
    ]
    for r in report["variants"]:
        if "error" in r:
            rows.append(f"{r['name']:62s} {r['arch']:>3d} ERROR {r['error']}")
            continue
        widths = lambda d: "/".join(str(b) for b in sorted(d, reverse=True)) or "-"  # noqa: E731
        est = r["estimate"] or {}
        ceil = " ".join(f"{v:.0f}%" for k, v in est.items() if k.startswith("ceiling")) or "-"
        rows.append(
            f"{r['name']:62s} {r['arch']:>3d} {r['n_regs']:>4d} {r['n_spills']:>5d} "
            f"{widths(r['ptx']['accesses']['ld']):>6s} {widths(r['ptx']['accesses']['st']):>6s} "
            f"{r['ptx']['mul_hi']:>5d} {r['sass']['hot_instructions']:>8d} "
            f"{est.get('cycles_per_element', float('nan')):>6.2f} {ceil:>14s} "
            f"{'=' if r.get('same_as') else r['compile_s']:>5}"
        )
    return "\n".join(rows)


def markdown(report: dict[str, Any]) -> str:
    """The report as the docs' table (docs/triton.md), one row per compiled variant."""
    head = (
        "| variant | sm | regs | spills | ld B | st B | mul.hi | hot SASS | cycles/elem | est. ceiling |\n"
        "|---|---|---|---|---|---|---|---|---|---|"
    )
    out = [head]
    for r in sorted(report["variants"], key=lambda r: (r["arch"] != 90, r["name"])):
        if "error" in r or r.get("same_as"):
            continue
        widths = lambda d: "/".join(str(b) for b in sorted(map(int, d), reverse=True)) or "-"  # noqa: E731
        est = r["estimate"] or {}
        ceil = (
            ", ".join(f"{k.split(' ', 1)[1]} {v:.0f}%" for k, v in est.items() if k.startswith("ceiling"))
            or "-"
        )
        cyc = f"{est['cycles_per_element']:.2f}" if est else "-"
        out.append(
            f"| {r['name']} | {r['arch']} | {r['n_regs']} | {r['n_spills']} | {widths(r['ptx']['accesses']['ld'])} "
            f"| {widths(r['ptx']['accesses']['st'])} | {r['ptx']['mul_hi']} | {r['sass']['hot_instructions']} "
            f"| {cyc} | {ceil} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="compute capabilities (80 90)")
    ap.add_argument("--grid", default="ci", choices=["ci", "full"])
    ap.add_argument("--only", default=None, help="compile only variants whose name contains this")
    ap.add_argument("--jobs", type=int, default=1, help="parallel compiles")
    ap.add_argument("--json", default=None, help="write the report here")
    ap.add_argument("--markdown", action="store_true", help="print the docs' table instead of the text one")
    ap.add_argument("--cache-dir", default=None, help="Triton cache to use (default: a fresh temporary one)")
    args = ap.parse_args(argv)
    problem = toolchain_problem()
    if problem:
        print(f"cannot compile for a GPU here: {problem}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"skipped": problem}, f)
        return 2
    pairs = [(v, a) for v, a in grid(args.grid, args.arch) if args.only is None or args.only in v.name]
    with tempfile.TemporaryDirectory() as tmp:
        from triton import knobs

        knobs.cache.dir = args.cache_dir or tmp  # cold compiles, as in CI, unless asked otherwise
        report = run(pairs, jobs=args.jobs)
    print(_table(report))
    print(
        f"{report['compiles']} compiles for {len(report['variants'])} (variant, arch) pairs in {report['seconds']} s"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return 1 if any("error" in r for r in report["variants"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
