"""The random streams of the Triton path: re-exported from ``zo_plugins.core.noise``, where
every stream (Rademacher, Philox/Box-Muller Gaussian, stochastic-rounding words) and every key
derivation is defined once.  The kernels import the core; the core never imports them."""

from __future__ import annotations

from ..core.noise import (
    GAUSSIAN_GROUP,
    RADEMACHER_GROUP,
    SR_SALT,
    TWO_PI_F32,
    as_int64,
    philox_key,
    philox_keys,
    round_key,
)

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
