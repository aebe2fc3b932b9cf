"""Check the Triton kernels on a real GPU: what the interpreter tests cannot see.

    python scripts/gpu_check.py                        # on a CUDA machine: ~1-2 minutes
    python scripts/gpu_check.py --json gpu_check.json  # also write the results
    TRITON_INTERPRET=1 python scripts/gpu_check.py --tiny   # the CPU-runnable parts, tiny sizes

A plain script, not pytest: ``tests/kernels/conftest.py`` forces the interpreter.  Each check
prints PASS, FAIL (with what differs) or SKIP (with why); the exit status is 1 if any failed.

* direction streams: Rademacher bit for bit against the reference for odd sizes and offsets;
  Gaussian within GAUSSIAN_ULP float32 ulps (the measured maximum and share differing printed);
* rounding: the compiled kernels' round-to-nearest (``cvt.rn``) and the bit arithmetic of
  ``philox.round_to_half`` against torch's casts on hard floats (ties, subnormals, overflow);
* every pass and rule against the PyTorch passes (Rademacher bit for bit; Adam within an ulp of
  its step; Gaussian within the bound), with frozen rows, magnitude masks and stochastic rounding;
* many tensors in one launch: one launch, and the same bits as one launch per tensor;
* a tensor of more than 2**31 elements, a view at an odd storage offset, parameters on a second
  GPU while the first is current, no host synchronisation per launch, the first-use check;
* registers and spills of every variant the run compiled, as the driver reports them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zo_plugins.core import passes as core  # noqa: E402
from zo_plugins.core.noise import PHILOX_GAUSSIAN, fill_direction_, tensor_key  # noqa: E402
from zo_plugins.core.passes import ParamSpec  # noqa: E402
from zo_plugins.core.rounding import round_to  # noqa: E402
from zo_plugins.kernels.philox import round_to_half  # noqa: E402

GAUSSIAN_ULP = 8  # docs/triton.md
Z_ULP = 2.0**-21  # float32 ulp of the largest Box-Muller normal (|z| < 8)
S1, S2, S3 = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888, 0x0123_4567_89AB_CDEF
HALF = (torch.bfloat16, torch.float16)
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class Skip(Exception):
    """A check that cannot run here, with the reason."""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().reshape(-1).contiguous()
    return t.view({1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape and got.dtype == want.dtype, (
        f"{what}: {got.shape}/{got.dtype} vs {want.shape}"
    )
    bad = (bits(got) != bits(want)).nonzero().reshape(-1)
    if bad.numel():
        i = bad[:4].tolist()
        g, w = got.reshape(-1)[i].tolist(), want.reshape(-1)[i].tolist()
        raise AssertionError(
            f"{what}: {bad.numel()} of {got.numel()} elements differ, first at {i}: {g} vs {w}"
        )


def assert_close(got: torch.Tensor, want: torch.Tensor, what: str, atol: float, rtol: float = 0.0) -> None:
    g, w = got.float().reshape(-1), want.float().reshape(-1)
    bad = ~torch.isclose(g, w, atol=atol, rtol=rtol)
    if bad.any():
        i = bad.nonzero().reshape(-1)[:4].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {g.numel()} beyond atol {atol:.2g} rtol {rtol:.2g}; first at {i}: "
            f"{g[i].tolist()} vs {w[i].tolist()}"
        )


def gaussian_tol(dtype: torch.dtype, coeffs, want: torch.Tensor) -> dict[str, float]:
    atol = sum(abs(c) for c in coeffs) * GAUSSIAN_ULP * Z_ULP + 2 * 2**-23 * want.float().abs().max().item()
    return dict(atol=atol, rtol={torch.float32: 0.0, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype])


def max_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    ia = a.float().reshape(-1).view(torch.int32).long()
    ib = b.float().reshape(-1).view(torch.int32).long()
    ia = torch.where(ia < 0, -(ia & 0x7FFFFFFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFFFFFF), ib)
    return (ia - ib).abs()


def theta(n: int, dtype: torch.dtype, device, seed: int = 0, offset: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    return (torch.randn(n + offset, generator=g) * 0.02).to(dtype).to(device)[offset:]


def spec_pair(t: torch.Tensor, name: str, frozen=()) -> tuple[ParamSpec, ParamSpec]:
    key = tensor_key(name)
    return ParamSpec(t, name, key, frozen_rows=tuple(frozen)), ParamSpec(
        t.clone(), name, key, frozen_rows=tuple(frozen)
    )


def torch_stream(dist: str) -> str:
    return PHILOX_GAUSSIAN if dist == "gaussian" else dist


# --------------------------------------------------------------------------- checks
def check_streams(ctx) -> str:
    from zo_plugins.kernels import reference as ref
    from zo_plugins.kernels.passes import triton_direction

    dev = ctx.device
    for n, off in [(1, 0), (127, 0), (129, 5), (4095, 4093), (10_007, 77), (ctx.n_big + 3, 1 << 20)]:
        got = triton_direction(n, distribution="rademacher", seed=S1, key=S2, offset=off, device=dev)
        want = fill_direction_(
            torch.empty(n, device=dev), distribution="rademacher", seed=S1, key=S2, offset=off, numel=off + n
        )
        assert_bitwise(got, want, f"rademacher n={n} offset={off}")
        got = triton_direction(n, distribution="gaussian", seed=S1, key=S2, offset=off, device=dev)
        want = ref.direction(n, distribution="gaussian", seed=S1, key=S2, offset=off, device=dev)
        u = int(max_ulps(got, want).max())
        assert u <= GAUSSIAN_ULP, f"gaussian n={n} offset={off}: {u} ulp > {GAUSSIAN_ULP}"
    n = ctx.n_gauss
    got = triton_direction(n, distribution="gaussian", seed=S3, key=S1, device=dev)
    want = ref.direction(n, distribution="gaussian", seed=S3, key=S1, device=dev)
    u = max_ulps(got, want)
    ctx.figures["gaussian_max_ulp"] = int(u.max())
    ctx.figures["gaussian_share_differing"] = round((u > 0).float().mean().item(), 5)
    assert int(u.max()) <= GAUSSIAN_ULP, f"gaussian: {int(u.max())} ulp > {GAUSSIAN_ULP}"
    return f"Rademacher bit-exact; Gaussian max {int(u.max())} ulp over {n}, {(u > 0).float().mean().item():.2%} differ"


def _hard_floats(device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    rnd = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            math.inf,
            -math.inf,
            65504.0,
            65519.0,
            65520.0,
            65536.0,
            2**-14,
            2**-24,
            2**-25,
            3 * 2**-26,
            1.5 * 2**-24,
            2.5 * 2**-24,
            1e-45,
            -1e-45,
            3.3895314e38,
            3.4e38,
            1 + 2**-8,
            1 + 3 * 2**-8,
            1 + 2**-11,
            1 + 3 * 2**-11,
            -(1 + 2**-8),
            0.1,
            -2.5e-6,
        ],
        dtype=torch.float32,
    )
    scaled = torch.randn(20000, generator=g) * torch.logspace(-9, 5, 20000)
    x = torch.cat([rnd.view(torch.float32), special, scaled, scaled * 2**-20])
    return x[~x.isnan()].to(device)


@triton.jit
def _cast_kernel(x_ptr, bits_ptr, hw_ptr, n, FP16: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr):
    """float32 -> half by ``philox.round_to_half`` (into float32 ``bits_ptr``: the interpreter's own
    narrowing cast mangles subnormals) and by the compiled cast (``hw_ptr``, half)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    x = tl.load(x_ptr + offs, mask=m, other=0.0)
    w = x.to(tl.uint32, bitcast=True)
    tl.store(bits_ptr + offs, round_to_half(x, w, FP16, False), mask=m)  # float32: exact half values
    if HW:
        tl.store(hw_ptr + offs, x.to(hw_ptr.dtype.element_ty), mask=m)


def check_rounding(ctx) -> str:
    x = _hard_floats(ctx.device)
    done = []
    for dtype in HALF:
        want = x.to(dtype)
        by_bits, by_hw = torch.empty_like(x), torch.empty_like(want)
        hw = not interpreting()  # the interpreter truncates in .to(): the kernels use the bit path there
        _cast_kernel[(triton.cdiv(x.numel(), 1024),)](
            x, by_bits, by_hw, x.numel(), FP16=dtype == torch.float16, HW=hw, BLOCK=1024
        )
        assert_bitwise(by_bits, want.float(), f"round_to_half {dtype} vs torch cast")
        assert_bitwise(round_to(x, dtype), want, f"core.rounding {dtype} vs torch cast")
        if hw:
            assert_bitwise(by_hw, want, f"cvt.rn {dtype} vs torch cast")
        done.append(str(dtype)[6:])
    return (
        f"{x.numel()} hard floats, {', '.join(done)}: bit arithmetic"
        + (" and cvt.rn" if hw else "")
        + " = torch"
    )


def check_passes(ctx) -> str:
    from zo_plugins.kernels import passes as kp

    dev = ctx.device
    shapes = [(1,), (127,), (7, 300), (ctx.n_big + 5,)]
    n = 0
    for dtype in DTYPES:
        for dist in ("rademacher", "gaussian"):
            for masked in (False, True):
                a, b = [], []
                for i, shape in enumerate(shapes):
                    t = theta(math.prod(shape), dtype, dev, seed=i).view(shape)
                    x, y = spec_pair(t, f"p{i}", frozen=(2, 5) if len(shape) == 2 else ())
                    a.append(x)
                    b.append(y)
                kthr = None
                if masked:  # the PyTorch passes' magnitude mask, the kernels' threshold: as the
                    # optimizer does, the threshold is one of the tensor's magnitudes (the 40th percentile)
                    from zo_plugins.core.sparsity import MagnitudeMask

                    for y in b:
                        mags = y.param.detach().float().abs().reshape(-1)
                        y.mask = MagnitudeMask(
                            y.param, float(mags.kthvalue(max(1, int(0.4 * mags.numel()))).values)
                        )
                    kthr = [y.mask.kernel_threshold for y in b]
                tkw = dict(distribution=torch_stream(dist), chunk_size=1 << 16)
                what = f"{dtype} {dist} masked={masked}"

                def cmp(got, want, label, coeffs):
                    if dist == "rademacher":
                        assert_bitwise(got, want, f"{label} {what}")
                    else:
                        assert_close(got, want, f"{label} {what}", **gaussian_tol(dtype, coeffs, want))

                def sync():
                    for x, y in zip(a, b):
                        y.param.copy_(x.param)

                terms = [(S1, 1e-3), (S2, -2e-3)]
                if not masked:  # in-place perturbation is not offered with a magnitude mask
                    kp.triton_perturb_(a, terms, distribution=dist)
                    core.perturb_(b, terms, **tkw)
                    for x, y in zip(a, b):
                        cmp(x.param, y.param, "perturb", [1e-3, 2e-3])
                    sync()
                for x, y, th in zip(a, b, kthr or [None] * len(a)):
                    got = kp.triton_perturbed_copy(x, [(S1, 1e-3)], distribution=dist, magnitude_threshold=th)
                    cmp(got, core.perturbed_copy(y, [(S1, 1e-3)], **tkw), "perturbed copy", [1e-3])
                rs = 9 if dtype in HALF else None
                upd = dict(restore=[(S1, 1e-3)], update=[(S1, -4e-4), (S3, 1e-4)], decay=1e-3, round_seed=rs)
                kp.triton_update_foreach_(a, distribution=dist, magnitude_threshold=kthr, **upd)
                for y in b:
                    core.update_(y, **upd, **tkw)
                for x, y in zip(a, b):
                    cmp(x.param, y.param, "restore+update", [1e-3, 4e-4, 1e-4])
                n += 1
    return f"perturb / perturbed copy / restore+update x {n} (dtype, distribution, mask) cells agree"


def check_rules(ctx) -> str:
    from zo_plugins.core.updates import init_state, rule_update_
    from zo_plugins.kernels.rules import triton_rule_update_foreach_

    dev = ctx.device
    for dtype in DTYPES:
        for dist in ("rademacher", "gaussian"):
            for rule in ("sign", "momentum", "adam"):
                a, b = spec_pair(theta(7 * 700 + 0, dtype, dev, seed=3).view(7, 700), "w", frozen=(1,))
                sa, sb = init_state(rule, a.param), init_state(rule, b.param)
                for t in (1, 2, 3):
                    kw = dict(
                        rule=rule,
                        restore=[(S3 + t, 1e-3)] if t == 1 else [],
                        grads=[(S1 + t, 0.7), (S2 + t, -1.3)],
                        lr=1e-3,
                        weight_decay=0.1,
                        momentum=0.9,
                        betas=(0.9, 0.99),
                        adam_eps=1e-6,
                        round_seed=11 if dtype in HALF else None,
                    )
                    triton_rule_update_foreach_([a], states=[sa], steps=[t], distribution=dist, **kw)
                    rule_update_(
                        b, state=sb, adam_step=t, distribution=torch_stream(dist), chunk_size=1 << 16, **kw
                    )
                    what = f"{rule} {dtype} {dist} step {t}"
                    if dist == "rademacher" and rule != "adam":
                        assert_bitwise(a.param, b.param, what)
                        for k in sa:
                            assert_bitwise(sa[k], sb[k], f"{what} {k}")
                    else:  # Adam: sqrt/div rounding; Gaussian: directions within the bound
                        bound = 2 * 2 * 8 * GAUSSIAN_ULP * Z_ULP if dist == "gaussian" else 1e-6
                        for k in sa:
                            assert_close(sa[k], sb[k], f"{what} {k}", atol=bound, rtol=1e-5)
                        assert_close(
                            a.param,
                            b.param,
                            what,
                            atol=4e-3 * 2**-20 + bound * 1e-3,
                            rtol=torch.finfo(dtype).eps,
                        )
                    a.param.copy_(b.param)
                    for k in sa:
                        sa[k].copy_(sb[k])
    return "sign / momentum / Adam, 3 steps, fp32 / bf16 / fp16, both distributions"


def check_one_launch(ctx) -> str:
    from zo_plugins.kernels import passes as kp

    dev = ctx.device
    g = torch.Generator().manual_seed(1)
    sizes = torch.randint(1, ctx.n_many_max, (ctx.n_many,), generator=g).tolist()
    ts = [theta(n, torch.bfloat16, dev, seed=i) for i, n in enumerate(sizes)]
    specs = [ParamSpec(t, f"m{i}", tensor_key(f"m{i}")) for i, t in enumerate(ts)]
    launches = []
    real = kp._zo_pass_kernel

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    kp._zo_pass_kernel = Counting()
    try:
        many = kp.triton_perturbed_copies(specs, [(S1, 1e-3)], distribution="gaussian")
    finally:
        kp._zo_pass_kernel = real
    assert len(launches) == 1, f"{len(specs)} tensors took {len(launches)} launches"
    for i, s in enumerate(specs):
        assert_bitwise(
            many[i], kp.triton_perturbed_copy(s, [(S1, 1e-3)], distribution="gaussian"), f"tensor {i}"
        )
    return (
        f"{len(specs)} bf16 tensors of 1..{ctx.n_many_max} elements: 1 launch, same bits as one launch each"
    )


def check_big_tensor(ctx) -> str:
    from zo_plugins.kernels import passes as kp
    from zo_plugins.kernels import reference as ref

    if ctx.device.type != "cuda" or ctx.tiny:
        raise Skip("needs a GPU with ~10 GB free (run without --tiny)")
    n = (1 << 31) + 4099
    t = torch.zeros(n, dtype=torch.bfloat16, device=ctx.device)
    t[-(1 << 12) :] = 0.5
    spec = ParamSpec(t, "big", tensor_key("big"))
    kp.triton_perturb_([spec], [(S1, 2.0**-4)], distribution="rademacher")
    for lo in (0, (1 << 31) - 2048, (1 << 31) + 17, n - 4099):
        m = 4099 if lo + 4099 <= n else n - lo
        z = ref.direction(m, distribution="rademacher", seed=S1, key=spec.key, offset=lo, device=ctx.device)
        start = t[lo : lo + m].float()
        was = torch.where(torch.arange(lo, lo + m, device=ctx.device) >= n - (1 << 12), 0.5, 0.0)
        assert_bitwise(start, (was + 2.0**-4 * z).to(torch.bfloat16).float(), f"elements [{lo}, {lo + m})")
    del t
    torch.cuda.empty_cache()
    return f"{n} elements (2**31 + 4099): the slices around 2**31 and at the end are exact"


def check_odd_offset(ctx) -> str:
    from zo_plugins.kernels import passes as kp

    for dtype in DTYPES:
        store = theta(20_001, dtype, ctx.device, seed=4)
        twin = store.clone()
        a = ParamSpec(store[1:], "v", tensor_key("v"))
        b = ParamSpec(twin[1:], "v", tensor_key("v"))
        (launch,) = kp._pass_launches(
            [kp._Job(a.param, a.param, a.key)], [(S1, 1e-3)], distribution="rademacher"
        )
        assert launch.constexprs["ALIGNED"] is False, "an odd offset must take the scalar path"
        kp.triton_perturb_([a], [(S1, 1e-3)], distribution="rademacher")
        core.perturb_([b], [(S1, 1e-3)], distribution="rademacher", chunk_size=1 << 16)
        kp.triton_update_(
            a, restore=[(S1, 1e-3)], update=[(S1, -1e-4)], decay=1e-3, distribution="rademacher"
        )
        core.update_(
            b,
            restore=[(S1, 1e-3)],
            update=[(S1, -1e-4)],
            decay=1e-3,
            distribution="rademacher",
            chunk_size=1 << 16,
        )
        assert_bitwise(store, twin, f"{dtype} view at storage offset 1 (and the element before it)")
    return "contiguous views 2 / 4 bytes off alignment: scalar path, bit-exact, neighbour untouched"


def check_second_gpu(ctx) -> str:
    from zo_plugins.core.updates import init_state, rule_update_
    from zo_plugins.kernels import passes as kp
    from zo_plugins.kernels.rules import triton_rule_update_foreach_

    if ctx.device.type != "cuda" or torch.cuda.device_count() < 2:
        raise Skip(f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} GPU(s) visible, needs 2")
    dev = torch.device("cuda", 1)
    with torch.cuda.device(0):  # the current device is not the tensors'
        a, b = spec_pair(theta(10_007, torch.bfloat16, dev), "second")
        kp.triton_perturb_([a], [(S1, 1e-3)], distribution="rademacher")
        core.perturb_([b], [(S1, 1e-3)], distribution="rademacher", chunk_size=1 << 16)
        kw = dict(rule="momentum", restore=[], grads=[(S2, 0.5)], lr=1e-3, weight_decay=0.0)
        sa, sb = init_state("momentum", a.param), init_state("momentum", b.param)
        triton_rule_update_foreach_([a], states=[sa], steps=[1], distribution="rademacher", **kw)
        rule_update_(b, state=sb, adam_step=1, distribution="rademacher", chunk_size=1 << 16, **kw)
        torch.cuda.synchronize(dev)
        assert torch.cuda.current_device() == 0
    assert_bitwise(a.param, b.param, "cuda:1 while cuda:0 is current")
    return "tensors on cuda:1 with cuda:0 current: bit-exact"


def check_no_host_sync(ctx) -> str:
    from zo_plugins.kernels import passes as kp

    if ctx.device.type != "cuda":
        raise Skip("needs a GPU")
    specs = [
        ParamSpec(theta(n, torch.bfloat16, ctx.device, seed=n), f"s{n}", tensor_key(f"s{n}"))
        for n in (100, 5000, 1 << 20)
    ]
    for _ in range(3):  # compiled and cached
        kp.triton_perturb_(specs, [(S1, 1e-3)], distribution="rademacher")
        kp.triton_perturbed_copies(specs, [(S1, 1e-3)], distribution="rademacher")
    torch.cuda.synchronize()
    cycles = int(2e9)  # ~1 s of GPU time ahead of the host
    t0 = time.perf_counter()
    torch.cuda._sleep(cycles)
    launches = 50
    for i in range(launches):
        kp.triton_perturb_(specs, [(S1 + i, 1e-3)], distribution="rademacher")
    host = time.perf_counter() - t0
    torch.cuda.synchronize()
    total = time.perf_counter() - t0
    assert host < 0.5 * total, (
        f"{launches} launches took {host:.3f} s on the host of {total:.3f} s: they wait for the GPU"
    )
    return f"{launches} launches queued in {host * 1e3:.1f} ms behind ~{total:.2f} s of GPU work ({host / launches * 1e6:.0f} us each)"


def check_self_check(ctx) -> str:
    from zo_plugins.core.backend import _run_self_check

    reason = _run_self_check(ctx.device)
    assert reason is None, reason
    return f"the first-use check passes on {ctx.device}"


def compiled_figures(ctx) -> str:
    from zo_plugins.kernels.passes import _zo_pass_kernel
    from zo_plugins.kernels.rules import _zo_rule_kernel

    if ctx.device.type != "cuda":
        raise Skip("the interpreter compiles nothing")
    out = []
    for kern in (_zo_pass_kernel, _zo_rule_kernel):
        for kernels, keys, *_ in kern.device_caches.values():
            for (specialization, _options), cache_key in keys.items():
                k = kernels.get(cache_key)
                if k is None or getattr(k, "n_regs", None) is None:
                    continue
                consts = {n: v for n, (t, v) in zip(kern.arg_names, specialization) if t == "constexpr"}
                out.append(
                    dict(kernel=kern.fn.__name__, constexprs=consts, n_regs=k.n_regs, n_spills=k.n_spills)
                )
    ctx.figures["compiled"] = out
    spills = [o for o in out if o["n_spills"]]
    assert not spills, f"spills: {spills[:3]}"
    regs = sorted(o["n_regs"] for o in out)
    return f"{len(out)} variants compiled here: registers {regs[0]}..{regs[-1]} (median {regs[len(regs) // 2]}), no spills"


CHECKS = [
    ("direction streams", check_streams),
    ("half-precision rounding", check_rounding),
    ("passes vs PyTorch", check_passes),
    ("rules vs PyTorch", check_rules),
    ("many tensors, one launch", check_one_launch),
    ("tensor above 2**31 elements", check_big_tensor),
    ("view at an odd storage offset", check_odd_offset),
    ("parameters on a second GPU", check_second_gpu),
    ("no host sync per launch", check_no_host_sync),
    ("first-use check", check_self_check),
    ("registers and spills", compiled_figures),
]


class Context:
    def __init__(self, device: torch.device, tiny: bool) -> None:
        self.device, self.tiny = device, tiny
        self.n_big = 5000 if tiny else 1 << 22  # "large" tensors of the pass checks
        self.n_gauss = 1 << 14 if tiny else 1 << 24
        self.n_many, self.n_many_max = (20, 300) if tiny else (300, 20_000)
        self.figures: dict = {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="small sizes (CPU under TRITON_INTERPRET=1)")
    ap.add_argument("--only", default=None, help="run the checks whose name contains this")
    ap.add_argument("--json", default=None, help="write the results here")
    args = ap.parse_args(argv)
    if interpreting():  # numpy warns on inf * 2**24 in lanes the rounding discards
        warnings.filterwarnings("ignore", category=RuntimeWarning)
    if torch.cuda.is_available() and not interpreting():
        device = torch.device("cuda", 0)
        torch.cuda.set_device(device)
    elif interpreting():
        device = torch.device("cpu")
        args.tiny = True
    else:
        print(
            "scripts/gpu_check.py needs a CUDA GPU, or TRITON_INTERPRET=1 --tiny for its CPU-runnable parts.",
            file=sys.stderr,
        )
        return 2
    ctx = Context(device, args.tiny)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (interpreter)"
    print(f"gpu_check on {name}, torch {torch.__version__}, triton {triton.__version__}")
    results, failed = [], 0
    for title, fn in CHECKS:
        if args.only and args.only not in title:
            continue
        t0 = time.perf_counter()
        try:
            detail, status = fn(ctx), "PASS"
        except Skip as exc:
            detail, status = str(exc), "SKIP"
        except Exception as exc:  # noqa: BLE001 - every check reports, the run goes on
            detail, status = f"{type(exc).__name__}: {exc}", "FAIL"
            failed += 1
            traceback.print_exc()
        dt_s = time.perf_counter() - t0
        print(f"{status} {title} ({dt_s:.1f} s): {detail}", flush=True)
        results.append(dict(check=title, status=status, detail=detail, seconds=round(dt_s, 2)))
    print(
        f"{failed} failed, {sum(r['status'] == 'PASS' for r in results)} passed, "
        f"{sum(r['status'] == 'SKIP' for r in results)} skipped"
    )
    if args.json:
        Path(args.json).write_text(
            json.dumps(dict(device=name, results=results, figures=ctx.figures), indent=1)
        )
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
