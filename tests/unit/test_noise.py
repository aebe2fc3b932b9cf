"""Directions: keyed, counter-based, chunk-invariant, with the right moments."""

import pytest
import torch

from zo_plugins.core import noise
from zo_plugins.core.noise import fill_direction_, mix64, philox4x32, step_seed, tensor_key


def _z(n, dist, seed=123, key=456, offset=0, numel=None):
    return fill_direction_(torch.empty(n), distribution=dist, seed=seed, key=key, offset=offset, numel=numel)


@pytest.mark.parametrize(
    "counter, key, expected",
    [  # Known-answer vectors of Philox-4x32-10 from Random123 (kat_vectors)
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ],
)
def test_philox_known_answers(counter, key, expected):
    c = (
        torch.tensor([counter[0] | (counter[1] << 32)], dtype=torch.int64)
        if counter[1] < 0x80000000
        else torch.tensor([(counter[0] | (counter[1] << 32)) - (1 << 64)], dtype=torch.int64)
    )
    out = philox4x32(
        c, key[0] | (key[1] << 32), high=(torch.tensor([counter[2]]), torch.tensor([counter[3]]))
    )
    assert tuple(int(o.item()) for o in out) == expected


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_direction_is_pure_function_of_seed_key_offset(dist):
    a, b = _z(5000, dist), _z(5000, dist)
    assert torch.equal(a, b)
    assert not torch.equal(a, _z(5000, dist, seed=124))
    assert not torch.equal(a, _z(5000, dist, key=457))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_chunking_does_not_change_the_stream(dist):
    n = 3 * noise.GAUSSIAN_BLOCK + 517
    whole = _z(n, dist)
    # pieces at offsets aligned as the passes align them (multiples of 128), and odd sizes
    cuts = [
        0,
        128 * 7,
        noise.GAUSSIAN_BLOCK,
        noise.GAUSSIAN_BLOCK + 128 * 300,
        2 * noise.GAUSSIAN_BLOCK + 256,
        n,
    ]
    pieces = torch.cat([_z(hi - lo, dist, offset=lo, numel=n) for lo, hi in zip(cuts, cuts[1:])])
    assert torch.equal(whole, pieces)


def test_gaussian_unaligned_offsets_match():
    whole = _z(1000, "gaussian", offset=0)
    assert torch.equal(whole[333:777], _z(444, "gaussian", offset=333, numel=1000))


@pytest.mark.parametrize("dist", ["gaussian", "rademacher"])
def test_moments_and_independence(dist):
    n = 1 << 18
    z1, z2, z3 = _z(n, dist, seed=1, key=1), _z(n, dist, seed=1, key=2), _z(n, dist, seed=2, key=1)
    assert abs(z1.mean().item()) < 5 / n**0.5
    assert abs(z1.var().item() - 1) < 0.02
    if dist == "rademacher":
        assert set(z1.unique().tolist()) == {-1.0, 1.0}
    else:  # fourth moment of a standard normal is 3
        assert abs((z1**4).mean().item() - 3) < 0.1
    for other in (z2, z3):  # across tensors and across steps
        assert abs((z1 * other).mean().item()) < 5 / n**0.5


def test_global_rng_untouched():
    cpu = torch.get_rng_state()
    _z(200_000, "gaussian")
    _z(200_000, "rademacher")
    assert torch.equal(cpu, torch.get_rng_state())


def test_keys_and_seeds_are_stable_values():
    # These values define the stream: changing them breaks resume across versions.
    assert tensor_key("model.layers.0.weight") == tensor_key("model.layers.0.weight")
    assert tensor_key("a") != tensor_key("b")
    assert step_seed(0, 1) != step_seed(0, 2) != step_seed(1, 1)
    assert mix64(1, 2) != mix64(2, 1)
    assert 0 <= mix64(2**70, -1) < 2**64


def test_unknown_distribution_is_refused():
    with pytest.raises(ValueError, match="not one of"):
        _z(10, "uniform")


def test_philox_gaussian_stream_is_the_kernels_stream_and_chunk_invariant():
    from zo_plugins.kernels.reference import fill_philox_gaussian_

    whole = _z(3001, "gaussian-philox")
    want = fill_philox_gaussian_(torch.empty(3001), seed=123, key=456)
    assert torch.equal(whole, want)
    parts = torch.cat([_z(1000, "gaussian-philox", offset=0), _z(2001, "gaussian-philox", offset=1000)])
    assert torch.equal(parts, whole)
    assert abs(whole.mean().item()) < 0.1 and abs(whole.var().item() - 1) < 0.1
    assert not torch.equal(whole, _z(3001, "gaussian")), "the native stream is a different stream"


def test_optimizer_stream_follows_gaussian_stream():
    from zo_plugins import ZOOptimizer
    from zo_plugins.core.optimizer import materialize_direction
    from zo_plugins.kernels.reference import fill_philox_gaussian_

    lin = torch.nn.Linear(7, 5)
    assert ZOOptimizer(lin, lr=0.1).stream == "gaussian"  # CPU, torch backend: native blocks
    assert ZOOptimizer(lin, lr=0.1, distribution="rademacher").stream == "rademacher"
    opt = ZOOptimizer(lin, lr=0.1, gaussian_stream="philox")
    assert opt.stream == "gaussian-philox"
    spec = next(s for s in opt.specs() if s.param is lin.weight)
    z = materialize_direction(opt, lin.weight, step=3)
    want = fill_philox_gaussian_(torch.empty(35), seed=opt.seeds_for(3)[0], key=spec.key).view(5, 7)
    assert torch.equal(z, want)
