"""The launcher and the tile paths of the kernels (interpreter): whole tiles and partial tiles,
the sub-tiles a partial tile runs in when compiled, the alignment check that picks the vector
path, stream offsets past 2**31, runtime term loops, one host-to-device copy per launch, and
launches under the tensors' own device."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from kernel_helpers import assert_bitwise, assert_close, gaussian_tol, triton_or_skip

triton_or_skip()

from zo_plugins.core import passes as core  # noqa: E402
from zo_plugins.core.noise import fill_direction_, tensor_key  # noqa: E402
from zo_plugins.core.passes import ParamSpec  # noqa: E402
from zo_plugins.core.updates import init_state, rule_update_  # noqa: E402
from zo_plugins.kernels import passes as kp  # noqa: E402
from zo_plugins.kernels import reference as ref  # noqa: E402
from zo_plugins.kernels import rules as kr  # noqa: E402

S1, S2 = 0x1111_2222_3333_4444, 0x5555_6666_7777_8888


def _theta(n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(dtype)


@pytest.fixture(params=[1, 4], ids=["one-tail-tile", "tail-in-4-subtiles"])
def tail_split(request, monkeypatch):
    """Partial tiles as the interpreter runs them (one tile) and as compiled kernels do (4)."""
    split = request.param
    fn = lambda block, width: max(1, min(split, block // width))  # noqa: E731
    monkeypatch.setattr(kp, "_tail_split", fn)
    monkeypatch.setattr(kr, "_tail_split", fn)
    return split


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_whole_and_partial_tiles_are_bit_identical_to_the_pytorch_passes(dtype, tail_split):
    # block 512: 1000 elements = one whole tile + a partial one; 3000 with frozen rows
    a = [_theta(1000, dtype, 1), _theta(3000, dtype, 2).view(30, 100), _theta(7, dtype, 3)]
    b = [t.clone() for t in a]
    frozen = lambda t: (4, 17) if t.dim() == 2 else ()  # noqa: E731
    sa = [ParamSpec(t, f"p{i}", tensor_key(f"p{i}"), frozen_rows=frozen(t)) for i, t in enumerate(a)]
    sb = [ParamSpec(t, f"p{i}", tensor_key(f"p{i}"), frozen_rows=frozen(t)) for i, t in enumerate(b)]
    kw = dict(distribution="rademacher", chunk_size=256)
    terms = [(S1, 1e-3), (S2, -2e-3), (S1 + 1, 5e-4)]  # K = 3: the runtime term loop
    kp.triton_perturb_(sa, terms, block=512, **kw)
    core.perturb_(sb, terms, **kw)
    for x, y in zip(a, b):
        assert_bitwise(x, y, f"perturb {dtype} split={tail_split}")
    for x, y in zip(sa, sb):
        kp.triton_update_(x, restore=[(S2, 2e-3)], update=[(S2, -3e-4)], decay=1e-3, block=512, **kw)
        core.update_(y, restore=[(S2, 2e-3)], update=[(S2, -3e-4)], decay=1e-3, **kw)
    for x, y in zip(a, b):
        assert_bitwise(x, y, f"update {dtype} split={tail_split}")


def test_gaussian_partial_tiles_and_shards_match_the_reference(tail_split):
    n = 5000
    full = ref.direction(n, distribution="gaussian", seed=S1, key=7)
    for lo, hi, block in [(0, n, 1024), (3, 4097, 512), (1021, 5000, 256)]:
        got = kp.triton_direction(
            hi - lo, distribution="gaussian", seed=S1, key=7, offset=lo, device="cpu", block=block
        )
        assert_close(
            got, full[lo:hi], f"[{lo}, {hi}) block {block}", **gaussian_tol(torch.float32, [1.0], got)
        )


@pytest.mark.parametrize("dist", ["rademacher", "gaussian"])
def test_a_shard_past_2_to_the_31_generates_its_slice(dist):
    offset = (1 << 31) + 77  # int64 stream indices: counters past 2**24, elements past 2**31
    got = kp.triton_direction(300, distribution=dist, seed=S1, key=9, offset=offset, device="cpu", block=256)
    want = ref.direction(300, distribution=dist, seed=S1, key=9, offset=offset)
    if dist == "rademacher":
        core_z = fill_direction_(
            torch.empty(300), distribution="rademacher", seed=S1, key=9, offset=offset, numel=offset + 300
        )
        assert_bitwise(got, core_z, "rademacher past 2**31")
    else:
        assert_close(got, want, "gaussian past 2**31", **gaussian_tol(torch.float32, [1.0], want))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_view_at_an_odd_storage_offset_takes_the_scalar_path_and_stays_exact(dtype):
    store = _theta(1201, dtype, 4)
    twin = store.clone()
    view, twin_view = store[1:], twin[1:]  # contiguous, but 2 or 4 bytes past an aligned address
    spec = ParamSpec(view, "v", tensor_key("v"))
    (launch,) = kp._pass_launches([kp._Job(view, view, spec.key)], [(S1, 1e-3)], distribution="rademacher")
    assert launch.constexprs["ALIGNED"] is False
    aligned = _theta(1200, dtype, 5)
    (launch,) = kp._pass_launches([kp._Job(aligned, aligned, 1)], [(S1, 1e-3)], distribution="rademacher")
    assert launch.constexprs["ALIGNED"] is True
    kp.triton_perturb_([spec], [(S1, 1e-3)], distribution="rademacher", block=256)
    core.perturb_(
        [ParamSpec(twin_view, "v", spec.key)], [(S1, 1e-3)], distribution="rademacher", chunk_size=64
    )
    assert_bitwise(store, twin, "odd-offset view (and the element before it)")


def test_alignment_groups_launch_separately():
    ok = _theta(300)
    odd = _theta(301)[1:]
    launches = kp._pass_launches(
        [kp._Job(ok, ok, 1), kp._Job(odd, odd, 2), kp._Job(ok.clone(), ok.clone(), 3)],
        [(S1, 1e-3)],
        distribution="gaussian",
    )
    assert sorted((launch.constexprs["ALIGNED"], launch.table.shape[0]) for launch in launches) == [
        (False, 1),
        (True, 2),
    ]


def test_programs_find_their_tensor_without_a_tile_table():
    sizes = [1, 4096, 4097, 3, 9000]
    jobs = [kp._Job(_theta(n, seed=n), _theta(n, seed=n), i) for i, n in enumerate(sizes)]
    (launch,) = kp._pass_launches(jobs, [(S1, 1e-3)], distribution="rademacher", block=2048)
    first = launch.table[:, int(kp._FIRST)]
    tiles = [-(-n // 2048) for n in sizes]
    assert first.tolist() == np.concatenate([[0], np.cumsum(tiles)[:-1]]).tolist()
    assert launch.grid == sum(tiles) and launch.args["n_search"] == 3  # ceil(log2(5))
    assert launch.constexprs["TAILS"] is True
    assert all(isinstance(v, (int, float)) for v in launch.args.values()), launch.args
    assert not hasattr(kp, "_TILES"), "no per-shape tile tables: they were uploaded on every cache miss"


def test_every_launch_uploads_one_table_and_nothing_else(monkeypatch):
    uploads = []
    real = kp._device_table

    def counting(table, device):
        uploads.append(table.shape)
        return real(table, device)

    monkeypatch.setattr(kp, "_device_table", counting)
    specs = [ParamSpec(_theta(n, seed=n), f"t{n}", tensor_key(f"t{n}")) for n in (5, 700, 3000)]
    kp.triton_perturb_(specs, [(S1, 1e-3)], distribution="rademacher")
    kp.triton_update_foreach_(specs, restore=[(S1, 1e-3)], update=[(S1, -1e-4)], decay=0.0,
                              distribution="rademacher")  # fmt: skip
    states = [init_state("adam", s.param) for s in specs]
    kr.triton_rule_update_foreach_(specs, rule="adam", restore=[], grads=[(S2, 0.5)], lr=1e-3, weight_decay=0.1,
                                   states=states, steps=[1] * 3, distribution="rademacher")  # fmt: skip
    assert uploads == [(3, 10), (3, 10), (3, 12)]  # one table per launch, one launch per pass


def test_cuda_tables_are_pinned_before_their_non_blocking_copy(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: calls.append("pin") or self)

    def to(self, *args, **kwargs):
        calls.append(("to", str(args[0]), kwargs.get("non_blocking")))
        return self

    monkeypatch.setattr(torch.Tensor, "to", to)
    kp._device_table(np.zeros((2, 10), dtype=np.int64), torch.device("cuda", 1))
    assert calls == ["pin", ("to", "cuda:1", True)]


def test_launches_run_under_the_tensors_device(monkeypatch):
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(str(d))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    assert isinstance(kp._device_guard(torch.device("cpu")), contextlib.nullcontext)
    with kp._device_guard(torch.device("cuda", 1)):
        pass
    assert entered == ["cuda:1"]

    seen = []

    class Kernel:
        def __getitem__(self, grid):
            return lambda *a, **k: seen.append((list(entered), grid))

    monkeypatch.setattr(kp, "_device_table", lambda table, dev: torch.from_numpy(table))
    launch = kp.Launch(Kernel(), torch.device("cuda", 1), 3, np.zeros((1, 9), np.int64), {}, {})
    kp._launch(launch)
    assert seen == [(["cuda:1", "cuda:1"], (3,))], "the kernel must be launched inside the device guard"


@pytest.mark.parametrize("rule", ["sign", "momentum"])
def test_rule_partial_tiles_are_bit_identical_to_the_pytorch_rule(rule, tail_split):
    theta = _theta(1500).view(15, 100)
    a = ParamSpec(theta.clone(), "w", tensor_key("w"), frozen_rows=(3,))
    b = ParamSpec(theta.clone(), "w", tensor_key("w"), frozen_rows=(3,))
    sa, sb = init_state(rule, a.param), init_state(rule, b.param)
    common = dict(rule=rule, restore=[(S2, 1e-3)], grads=[(S1, 0.7), (S2, -1.3)], lr=1e-3, weight_decay=0.1,
                  momentum=0.9)  # fmt: skip
    rule_update_(a, state=sa, adam_step=1, distribution="rademacher", chunk_size=1 << 20, **common)
    kr.triton_rule_update_foreach_(
        [b], states=[sb], steps=[1], distribution="rademacher", block=512, **common
    )
    assert_bitwise(b.param, a.param, f"{rule} weights split={tail_split}")
    for k in sa:
        assert_bitwise(sb[k], sa[k], f"{rule} {k}")
    assert_bitwise(b.param[3], theta[3], "frozen row")
