"""Golden values: the first elements of every direction stream (and of the key derivation and
the stochastic-rounding words) for fixed (seed, step, key), pinned.  A torch upgrade or a
refactor that changes a stream -- and so orphans every recorded trajectory -- fails here
loudly; such a change must bump ``core.noise.STREAM_VERSION``.

Values are float32 written as float.hex (exact).  The Philox/Box-Muller Gaussian goes through
log/cos/sin, whose last ulp differs between math libraries (docs/triton.md): it is pinned to
4 float32 ulps; the other streams bit for bit.
"""

from __future__ import annotations

import torch
from torch import nn

from zo_plugins import ZOOptimizer
from zo_plugins.core.noise import STREAM_VERSION, fill_direction_, mix64, round_words, step_seed, tensor_key
from zo_plugins.core.optimizer import materialize_direction

SEED = step_seed(7, 3)
KEY = tensor_key("model.layers.0.mlp.up_proj.weight")
GOLDEN = {
    "rademacher": ["0x1p+0", "0x1p+0", "0x1p+0", "0x1p+0", "-0x1p+0", "-0x1p+0", "-0x1p+0", "0x1p+0"],
    "gaussian": [
        "-0x1.47813p-3", "-0x1.e8ac7cp-2", "0x1.4296dap-1", "0x1.c5218ap-1",
        "0x1.876fb8p-3", "0x1.4a64bp+1", "-0x1.e48bf6p+0", "-0x1.b3e078p+0",
    ],
    "gaussian-philox": [
        "-0x1.d605fap-3", "-0x1.023bp-3", "0x1.0afd1ap-4", "0x1.d28b64p+0",
        "0x1.e356cep-4", "-0x1.e03e7p-3", "0x1.5e07b8p-1", "-0x1.7117fap-2",
    ],
}  # fmt: skip


def _values(hexes):
    return torch.tensor([float.fromhex(h) for h in hexes], dtype=torch.float32)


def test_the_stream_version_is_the_one_these_values_pin():
    assert STREAM_VERSION == 2


def test_key_derivation_is_pinned():
    assert mix64(1, 2, 3) == 0xCD8D705991914EA1
    assert step_seed(0, 0) == 0xEA51A6138A71C982
    assert SEED == 0xECD1EEB759DEE584
    assert tensor_key("w") == 0x20925082A2286B9E
    assert KEY == 0x345B65BAF420F1E5


def test_every_direction_stream_is_pinned():
    for stream, hexes in GOLDEN.items():
        z = fill_direction_(
            torch.empty(8), distribution=stream, seed=SEED, key=KEY, offset=70000, numel=200000
        )
        want = _values(hexes)
        if stream == "gaussian-philox":
            ulp = torch.finfo(torch.float32).eps * want.abs().clamp(min=2**-126)
            assert ((z - want).abs() <= 4 * ulp).all(), (stream, z.tolist())
        else:
            assert torch.equal(z, want), (stream, [float(v).hex() for v in z.tolist()])


def test_stochastic_rounding_words_are_pinned():
    words = round_words(6, round_seed=SEED, key=KEY, offset=5).tolist()
    assert words == [4219139997, 763416766, 2377000993, 4267008442, 565029898, 1900552338]


def test_the_sphere_direction_an_optimizer_applies_is_pinned():
    torch.manual_seed(0)
    m = nn.Linear(3, 2)
    opt = ZOOptimizer(m, lr=0.1, seed=7, distribution="sphere")
    z = materialize_direction(opt, m.weight, step=3).reshape(-1)
    want = _values(
        [
            "0x1.8d1fccp-1",
            "0x1.b4f99cp-2",
            "0x1.47245ap-1",
            "-0x1.235022p-2",
            "-0x1.dfaca6p+0",
            "-0x1.bde4fap-2",
        ]
    )
    assert torch.equal(z, want), [float(v).hex() for v in z.tolist()]
