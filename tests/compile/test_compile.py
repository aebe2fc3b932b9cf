"""What the compiled kernels must look like on sm_80 and sm_90 (the CI grid of
``zo_plugins.kernels.compile_report``; figures quoted in docs/triton.md).  Each assertion is a
property a regression would break: scalar instead of 16-byte accesses, a Philox call per element
instead of per thread and row, registers growing with the number of terms, spills."""

from __future__ import annotations

import os

import pytest

from zo_plugins.kernels import compile_report as cr

pytestmark = pytest.mark.slow

ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
META_BYTES = 8  # the launch table's int64 loads


def rows(report, *, arch=None, **want):
    out = []
    for r in report["variants"]:
        v = r["variant"]
        if arch is not None and r["arch"] != arch:
            continue
        if all(v[k] == x for k, x in want.items()):
            out.append(r)
    assert out, f"no variant with {want} on sm_{arch}"
    return out


def hot(report, **want):
    """One term, aligned, whole tiles, no mask / frozen rows / stochastic rounding."""
    base = dict(K=1, aligned=True, tails=False, masked=False, frozen=0, stochastic=False)
    return rows(report, **{**base, **want})


def test_every_variant_of_the_grid_compiles_for_sm80_and_sm90(compile_report):
    errors = [f"{r['name']} sm_{r['arch']}: {r['error']}" for r in compile_report["variants"] if "error" in r]
    assert not errors, "\n".join(errors)
    got = {(r["name"], r["arch"]) for r in compile_report["variants"]}
    want = {(v.name, arch) for v, arch in cr.grid("ci")}
    assert got == want, f"missing {sorted(want - got)[:5]}"
    assert {80, 90} <= set(compile_report["archs"])


def test_no_variant_spills(compile_report):
    spills = [(r["name"], r["arch"], r["n_spills"]) for r in compile_report["variants"] if r["n_spills"]]
    assert not spills, spills  # every variant of the grid has K <= 4


def test_aligned_whole_tiles_move_data_in_16_byte_vectors_only(compile_report):
    for r in rows(compile_report, aligned=True, tails=False):
        ld, st = r["ptx"]["accesses"]["ld"], r["ptx"]["accesses"]["st"]
        assert set(map(int, st)) == {16}, f"{r['name']} sm_{r['arch']}: stores {st}"
        assert set(map(int, ld)) <= {16, META_BYTES} and "16" in {str(k) for k in ld}, (
            f"{r['name']} sm_{r['arch']}: loads {ld}"
        )


def test_partial_tiles_keep_the_vector_path_for_whole_tiles(compile_report):
    for r in rows(compile_report, aligned=True, tails=True):
        elem = ELEMENT_BYTES[r["variant"]["dtype"]]
        ld, st = ({int(k) for k in r["ptx"]["accesses"][x]} for x in ("ld", "st"))
        assert 16 in ld and 16 in st, f"{r['name']}: no vector path ({ld}, {st})"
        assert elem in st, f"{r['name']}: the masked tail should store element by element ({st})"


def test_a_view_at_an_odd_offset_takes_the_scalar_path(compile_report):
    # the host-side alignment check: vector accesses there would fault on the GPU
    for r in rows(compile_report, aligned=False):
        st = {int(k) for k in r["ptx"]["accesses"]["st"]}
        ld = {int(k) for k in r["ptx"]["accesses"]["ld"]}
        elem = ELEMENT_BYTES[r["variant"]["dtype"]]
        assert st == {elem} and 16 not in ld, f"{r['name']}: {ld}, {st}"
        assert r["constexprs"]["ALIGNED"] is False


def test_rademacher_costs_one_philox_call_per_thread_and_row(compile_report):
    # 20 mul.hi per Philox-4x32-10 call (2 per round), fewer where rounds fold: a thread owns a
    # 16-byte vector of each of the 4 words of one row, so one call serves 16 (fp32) or 32 elements
    for r in hot(compile_report, distribution="rademacher"):
        assert r["ptx"]["mul_hi"] <= 20, f"{r['name']} sm_{r['arch']}: {r['ptx']['mul_hi']} mul.hi"
        per_thread = r["constexprs"]["BLOCK"] // 128
        assert per_thread == 4 * 16 // ELEMENT_BYTES[r["variant"]["dtype"]], r["name"]


def test_gaussian_costs_one_philox_call_per_four_normals_per_thread(compile_report):
    for r in hot(compile_report, distribution="gaussian"):
        calls = r["constexprs"]["BLOCK"] // 128 // 4
        assert r["ptx"]["mul_hi"] <= 20 * calls, f"{r['name']} sm_{r['arch']}: {r['ptx']['mul_hi']} mul.hi"


def test_half_precision_rounds_to_nearest_with_the_hardware_conversion(compile_report):
    # cvt.rn (IEEE round to nearest even) instead of the interpreter's bit arithmetic; the GPU
    # check (scripts/gpu_check.py) compares it with torch's casts and the core's rounding
    for dtype in ("bfloat16", "float16"):
        for r in hot(compile_report, dtype=dtype, op="perturb"):
            assert r["ptx"]["cvt_rn_half"] > 0, f"{r['name']} sm_{r['arch']}"


def test_the_number_of_terms_does_not_change_the_compiled_kernel_beyond_one(compile_report):
    # K >= 2 runs the term loop at run time: K = 2, 3, 4 are one kernel with the same registers
    for r in rows(compile_report, arch=90, op="perturb", aligned=True, tails=False, K=3) + rows(
        compile_report, arch=90, op="perturb", aligned=True, tails=False, K=4
    ):
        assert r["same_as"] == r["name"].replace(f"K{r['variant']['K']}", "K2"), r["name"]


@pytest.mark.parametrize(
    ("what", "select", "bound"),
    [
        # measured (Triton 3.9): 32 on sm_80 and sm_90
        ("rademacher hot passes", dict(distribution="rademacher", op="perturb"), 40),
        # 51 (fp32) / 70-78 (bf16/fp16)
        ("gaussian hot passes", dict(distribution="gaussian", op="perturb"), 96),
    ],
)
def test_hot_pass_registers(compile_report, what, select, bound):
    for r in hot(compile_report, **select):
        assert r["n_regs"] <= bound, f"{what}: {r['name']} sm_{r['arch']} uses {r['n_regs']} registers"


def test_register_bounds_of_every_variant(compile_report):
    # measured: partial tiles 40-80, K = 2..4 64-110, the heaviest variants (two terms, masks,
    # frozen rows, stochastic rounding, tails, Adam state) <= 189; 255 is where spills begin
    for r in compile_report["variants"]:
        v = r["variant"]
        if v["op"] in ("perturb", "copy") and v["K"] == 1:
            bound = 96
        elif v["op"] in ("perturb", "copy", "update") and not (v["masked"] or v["frozen"] or v["stochastic"]):
            bound = 128
        else:
            bound = 224
        assert r["n_regs"] <= bound, f"{r['name']} sm_{r['arch']} uses {r['n_regs']} > {bound} registers"


def test_rademacher_hot_passes_are_not_issue_bound(compile_report):
    # issue cycles per element on sm_90 (estimated from the hot-path SASS): 0.69-0.90 measured;
    # an H100 must spend <= 2.5 (fp32) / 1.25 (bf16) for the pass to reach its HBM bandwidth
    for r in hot(compile_report, arch=90, distribution="rademacher", op="perturb"):
        est = r["estimate"]
        assert est is not None and est["cycles_per_element"] <= 1.2, (r["name"], est)
        assert est["ceiling_pct H100 SXM"] == 100.0, (r["name"], est)


def test_the_report_refuses_the_interpreter(monkeypatch):
    monkeypatch.setitem(os.environ, "TRITON_INTERPRET", "1")
    assert "TRITON_INTERPRET=1" in cr.toolchain_problem()
