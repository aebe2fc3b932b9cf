"""The random streams of the Triton path, defined once for the kernels and their references.

Every stream is a pure function of (seed, tensor key, element index): no state, no order.
Host-side helpers here derive the 64-bit Philox keys (vectorised with numpy, so a launch over
hundreds of tensors does not pay ~2 us of Python hashing per tensor and term).

* **rademacher** (bit-identical to ``zo_plugins.core.noise``): element ``i`` is ``+1`` if bit
  ``i % 32`` of word ``(i % 128) // 32`` of ``Philox4x32-10(counter=i // 128,
  key=mix64(step_seed, tensor_key))`` is set, else ``-1``.
* **gaussian** (Philox + Box-Muller; NOT the core's native-generator stream): with
  ``(w0, w1, w2, w3) = Philox4x32-10(counter=i // 4, key=mix64(step_seed, tensor_key))``,
  ``u1 = ((w >> 8) + 1) * 2**-24`` in (0, 1], ``u2 = (w' >> 8) * 2**-24`` in [0, 1),
  ``r = sqrt(-2 log u1)``, ``a = float32(2 pi) * u2``; element ``4c + 0, 1`` is
  ``r cos a, r sin a`` from ``(w0, w1)``, element ``4c + 2, 3`` the same from ``(w2, w3)``.
  All arithmetic float32.  The integer and uniform parts are exact on every backend;
  log/cos/sin differ by an ulp between math libraries (bound measured in docs/triton.md).
* **stochastic rounding** of bf16/fp16 stores: element ``i`` uses the 32-bit word ``i % 4``
  of ``Philox4x32-10(counter=i // 4, key=mix64(round_seed, tensor_key, SR_SALT))`` (the same
  key derivation as ``zo_plugins.core.passes.stochastic_round_``, a different generator).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..core.noise import mix64

__all__ = [
    "RADEMACHER_GROUP",
    "GAUSSIAN_GROUP",
    "SR_SALT",
    "TWO_PI_F32",
    "philox_key",
    "philox_keys",
    "round_key",
    "as_int64",
]

RADEMACHER_GROUP = 128
"""Elements per Philox call in the Rademacher stream (4 words x 32 bits)."""
GAUSSIAN_GROUP = 4
"""Elements per Philox call in the Gaussian stream (two Box-Muller pairs)."""
SR_SALT = 0x5721_0C4A_57D1_C0DE
"""Salt of the stochastic-rounding key; equal to the core's ``passes._SR_SALT``."""
TWO_PI_F32 = float(np.float32(2 * np.pi))
"""float32(2 pi) = 6.2831854820251465, the angle scale of Box-Muller."""

_U64 = np.uint64


def as_int64(u: int) -> int:
    """An unsigned 64-bit integer as the signed int64 with the same bits (for tensors)."""
    u &= (1 << 64) - 1
    return u - (1 << 64) if u >= 1 << 63 else u


def philox_key(step_seed: int, tensor_key: int) -> int:
    """The Philox key of a tensor's direction at ``step_seed`` (as in ``core.noise``)."""
    return mix64(step_seed, tensor_key)


def round_key(round_seed: int, tensor_key: int) -> int:
    """The Philox key of a tensor's stochastic-rounding stream."""
    return mix64(round_seed, tensor_key, SR_SALT)


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def philox_keys(seed: int, tensor_keys: Sequence[int] | np.ndarray, salt: int | None = None) -> np.ndarray:
    """``mix64(seed, k[, salt])`` for every ``k`` of ``tensor_keys``, as int64 bit patterns.

    numpy uint64 arithmetic wraps like the 64-bit masks of ``core.noise.mix64``; a test
    checks equality with it.  ~30x faster than the Python loop for hundreds of keys."""
    keys = np.asarray([int(k) & ((1 << 64) - 1) for k in tensor_keys], dtype=_U64)
    with np.errstate(over="ignore"):
        h = _splitmix64_np(
            np.full(keys.shape, 0x243F6A8885A308D3, dtype=_U64) ^ _U64(int(seed) & ((1 << 64) - 1))
        )
        h = _splitmix64_np(h ^ keys)
        if salt is not None:
            h = _splitmix64_np(h ^ _U64(salt & ((1 << 64) - 1)))
    return h.view(np.int64)
