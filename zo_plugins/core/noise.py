"""Keyed, counter-based perturbation directions.

A direction element is a pure function ``z(step_seed, tensor_key, element_offset)``: it does
not depend on the order tensors are visited, on how a tensor is chunked, or on any global RNG
state, so regeneration, resume, gradient accumulation and data-parallel ranks agree without
communication. Nothing here touches ``torch.manual_seed`` or the process-global generators.

Every stream the library draws is defined in this module (the Triton kernels import these
definitions; nothing here imports the kernels).  ``STREAM_VERSION`` names the definitions: a
trajectory log records it, and a change to any stream below must bump it.

* ``rademacher`` -- +/-1 signs taken from the bits of Philox-4x32-10 (the generator
  ``triton.language.randint4x`` implements).  Element ``i`` uses bit ``i % 128`` of the
  128-bit block produced for counter ``i // 128`` under the 64-bit key
  ``mix64(step_seed, tensor_key)``.  Integer streams are exact on every backend.  On CPU the
  PyTorch port costs ~0.3 ns/element because one Philox call yields 128 directions.
* ``gaussian`` -- standard normals.  A Philox/Box-Muller port in PyTorch ops measured 38 ms per
  million normals on 2 CPU cores (10x ``Tensor.normal_``), so the PyTorch path draws each
  block of ``GAUSSIAN_BLOCK`` elements from the device's native generator seeded with
  ``mix64(mix64(step_seed, tensor_key), block_index)``; a tensor's last block is
  shorter (its length follows from the tensor's size).  Caveat: PyTorch's CPU generator (mt19937)
  keeps only the low 32 bits of a seed, so two blocks collide with probability 2**-32.
* ``gaussian-philox`` -- Philox + Box-Muller, the Triton kernels' Gaussian: with
  ``(w0, w1, w2, w3) = Philox4x32-10(counter=i // 4, key=mix64(step_seed, tensor_key))``,
  ``u1 = ((w >> 8) + 1) * 2**-24`` in (0, 1], ``u2 = (w' >> 8) * 2**-24`` in [0, 1),
  ``r = sqrt(-2 log u1)``, ``a = float32(2 pi) * u2``; element ``4c + 0, 1`` is
  ``r cos a, r sin a`` from ``(w0, w1)``, element ``4c + 2, 3`` the same from ``(w2, w3)``.
  All arithmetic float32.  The integer and uniform parts are exact on every backend;
  log/cos/sin differ by an ulp between math libraries (bound measured in docs/triton.md).
* **stochastic-rounding words** of bf16/fp16 stores: element ``i`` uses the 32-bit word
  ``i % 4`` of ``Philox4x32-10(counter=i // 4, key=mix64(round_seed, tensor_key, SR_SALT))``;
  ``core.rounding`` turns a word into the rounding decision, identically on every backend.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

__all__ = [
    "STREAM_VERSION",
    "GAUSSIAN_BLOCK",
    "RADEMACHER_GROUP",
    "GAUSSIAN_GROUP",
    "SR_SALT",
    "TWO_PI_F32",
    "PHILOX_BITS",
    "DISTRIBUTIONS",
    "PHILOX_GAUSSIAN",
    "STREAMS",
    "mix64",
    "step_seed",
    "tensor_key",
    "philox4x32",
    "fill_direction_",
    "philox_key",
    "round_key",
    "philox_keys",
    "as_int64",
    "philox_words",
    "fill_philox_gaussian_",
    "round_words",
]

STREAM_VERSION = 2
"""Version of the stream definitions below (1: native-uniform stochastic rounding; 2: the
Philox rounding words shared with the Triton kernels)."""
MASK64 = (1 << 64) - 1
MASK32 = 0xFFFFFFFF
GAUSSIAN_BLOCK = 1 << 16
"""Elements per independently seeded Gaussian block (part of the stream's definition)."""
PHILOX_BITS = 128
"""Directions produced by one Philox-4x32 call (4 x 32 bits)."""
RADEMACHER_GROUP = PHILOX_BITS
"""Elements per Philox call in the Rademacher stream (4 words x 32 bits)."""
GAUSSIAN_GROUP = 4
"""Elements per Philox call in the Philox Gaussian stream (two Box-Muller pairs)."""
SR_SALT = 0x5721_0C4A_57D1_C0DE
"""Salt of the stochastic-rounding key."""
TWO_PI_F32 = float(np.float32(2 * np.pi))
"""float32(2 pi) = 6.2831854820251465, the angle scale of Box-Muller."""
_INV_2_24 = 2.0**-24
DISTRIBUTIONS = ("gaussian", "rademacher")
PHILOX_GAUSSIAN = "gaussian-philox"
"""The stream name the passes take for the Philox/Box-Muller Gaussian (``ZOConfig.gaussian_stream
= 'philox'``): the Triton kernels' Gaussian, generated here in PyTorch ops."""
STREAMS = ("gaussian", PHILOX_GAUSSIAN, "rademacher")
"""What the passes' ``distribution=`` argument accepts: 'gaussian' is the native-block stream."""

_PHILOX_M0, _PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
_PHILOX_W0, _PHILOX_W1 = 0x9E3779B9, 0xBB67AE85


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def mix64(*values: int) -> int:
    """Hash any number of integers into one well-mixed unsigned 64-bit integer."""
    h = 0x243F6A8885A308D3
    for v in values:
        h = _splitmix64(h ^ (int(v) & MASK64))
    return h


def step_seed(seed: int, step: int) -> int:
    """The seed of optimizer step ``step`` of a run started with ``seed``."""
    return mix64(seed, step, 0x5EED)


def tensor_key(name: str) -> int:
    """A stable 64-bit key for a parameter, from its qualified name (never ``id()``)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def philox4x32(
    counter: torch.Tensor,
    key: int,
    rounds: int = 10,
    high: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Philox-4x32-``rounds`` (Salmon et al., SC'11) on int64 tensors.

    ``counter`` holds the low 64 bits of the 128-bit counter (c0 = low 32, c1 = high 32);
    ``high`` optionally gives (c2, c3), zero by default.  Returns four int64 tensors holding
    unsigned 32-bit outputs.  int64 multiplication wraps, so the low 64 bits of a
    32x32-bit product are exact and give both mulhi and mullo.
    """
    k0, k1 = key & MASK32, (key >> 32) & MASK32
    c0 = counter & MASK32
    c1 = (counter >> 32) & MASK32
    if high is None:
        c2 = c3 = torch.zeros_like(c0)
    else:
        c2, c3 = high[0] & MASK32, high[1] & MASK32
    for _ in range(rounds):
        p0 = c0 * _PHILOX_M0
        p1 = c2 * _PHILOX_M1
        c0, c1, c2, c3 = (
            ((p1 >> 32) & MASK32) ^ c1 ^ k0,
            p1 & MASK32,
            ((p0 >> 32) & MASK32) ^ c3 ^ k1,
            p0 & MASK32,
        )
        k0 = (k0 + _PHILOX_W0) & MASK32
        k1 = (k1 + _PHILOX_W1) & MASK32
    return [c0, c1, c2, c3]


@lru_cache(maxsize=8)
def _sign_table(device: torch.device) -> torch.Tensor:
    """65536 x 16 table: row v holds +/-1 for the 16 bits of v (bit b -> column b)."""
    v = torch.arange(1 << 16, device=device, dtype=torch.int32).unsqueeze(1)
    bits = (v >> torch.arange(16, device=device, dtype=torch.int32)) & 1
    return bits.to(torch.float32) * 2 - 1


_generators: dict[torch.device, torch.Generator] = {}


def _generator(device: torch.device) -> torch.Generator:
    gen = _generators.get(device)
    if gen is None:
        gen = _generators[device] = torch.Generator(device=device)
    return gen


def _rademacher_(out: torch.Tensor, key: int, offset: int) -> None:
    n = out.numel()
    first = offset // PHILOX_BITS
    last = (offset + n + PHILOX_BITS - 1) // PHILOX_BITS
    counters = torch.arange(first, last, device=out.device, dtype=torch.int64)
    words = torch.stack(philox4x32(counters, key), dim=1)  # (m, 4) uint32 in int64
    halves = torch.stack([words & 0xFFFF, words >> 16], dim=2).reshape(-1)
    start = offset - first * PHILOX_BITS
    if start == 0 and n % PHILOX_BITS == 0 and out.is_contiguous():
        torch.index_select(_sign_table(out.device), 0, halves, out=out.view(-1, 16))
    else:
        signs = torch.index_select(_sign_table(out.device), 0, halves).reshape(-1)
        out.copy_(signs[start : start + n])


def native_blocks_(out: torch.Tensor, *, seed: int, offset: int, numel: int, draw) -> None:
    """Fill ``out`` with elements ``[offset, offset + len)`` of a stream made of blocks of
    ``GAUSSIAN_BLOCK`` elements (the last block of a tensor of ``numel`` elements is
    shorter); block ``b`` is ``draw(buffer_of_block_length, generator)`` with the generator
    seeded by ``mix64(seed, b)``.  Always drawing whole blocks keeps the stream independent
    of chunking: PyTorch's vectorised samplers are not prefix-stable."""
    gen = _generator(out.device)
    n = out.numel()
    pos = 0
    while pos < n:
        block, within = divmod(offset + pos, GAUSSIAN_BLOCK)
        block_len = min(GAUSSIAN_BLOCK, numel - block * GAUSSIAN_BLOCK)
        take = min(block_len - within, n - pos)
        if take <= 0:
            raise ValueError(f"Elements [{offset}, {offset + n}) lie outside a tensor of {numel} elements.")
        gen.manual_seed(mix64(seed, block) & (MASK64 >> 1))
        if within == 0 and take == block_len:
            draw(out[pos : pos + take], gen)
        else:
            tmp = torch.empty(block_len, device=out.device, dtype=out.dtype)
            draw(tmp, gen)
            out[pos : pos + take].copy_(tmp[within : within + take])
        pos += take


def _normal(buf: torch.Tensor, gen: torch.Generator) -> None:
    buf.normal_(generator=gen)


def fill_direction_(
    out: torch.Tensor,
    *,
    distribution: str,
    seed: int,
    key: int,
    offset: int = 0,
    numel: int | None = None,
) -> torch.Tensor:
    """Write the direction elements ``[offset, offset + out.numel())`` of the tensor with key
    ``key`` and ``numel`` elements (default: the request ends the tensor) at step seed
    ``seed`` into the 1-D float32 buffer ``out``; returns ``out``.  ``distribution`` is a
    stream of ``STREAMS``: 'gaussian' (native blocks), 'gaussian-philox' or 'rademacher'."""
    numel = offset + out.numel() if numel is None else numel
    if distribution == "rademacher":
        _rademacher_(out, mix64(seed, key), offset)
    elif distribution == "gaussian":
        native_blocks_(out, seed=mix64(seed, key), offset=offset, numel=numel, draw=_normal)
    elif distribution == PHILOX_GAUSSIAN:
        fill_philox_gaussian_(out, seed=seed, key=key, offset=offset)
    else:
        raise ValueError(f"distribution={distribution!r} is not one of {STREAMS}.")
    return out


# ----------------------------------------------------------------------------- Philox streams
def as_int64(u: int) -> int:
    """An unsigned 64-bit integer as the signed int64 with the same bits (for tensors)."""
    u &= MASK64
    return u - (1 << 64) if u >= 1 << 63 else u


def philox_key(step_seed: int, tensor_key: int) -> int:
    """The Philox key of a tensor's direction at ``step_seed``."""
    return mix64(step_seed, tensor_key)


def round_key(round_seed: int, tensor_key: int) -> int:
    """The Philox key of a tensor's stochastic-rounding stream."""
    return mix64(round_seed, tensor_key, SR_SALT)


_U64 = np.uint64


def _splitmix64_np(x: np.ndarray) -> np.ndarray:
    x = x + _U64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> _U64(27))) * _U64(0x94D049BB133111EB)
    return x ^ (x >> _U64(31))


def philox_keys(seed: int, tensor_keys: Sequence[int] | np.ndarray, salt: int | None = None) -> np.ndarray:
    """``mix64(seed, k[, salt])`` for every ``k`` of ``tensor_keys``, as int64 bit patterns.

    numpy uint64 arithmetic wraps like the 64-bit masks of ``mix64`` (a test checks equality);
    ~30x faster than the Python loop when a launch covers hundreds of tensors."""
    keys = np.asarray([int(k) & MASK64 for k in tensor_keys], dtype=_U64)
    with np.errstate(over="ignore"):
        h = _splitmix64_np(np.full(keys.shape, 0x243F6A8885A308D3, dtype=_U64) ^ _U64(int(seed) & MASK64))
        h = _splitmix64_np(h ^ keys)
        if salt is not None:
            h = _splitmix64_np(h ^ _U64(salt & MASK64))
    return h.view(np.int64)


def philox_words(first: int, count: int, key: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``(count, 4)`` int64 tensor of the Philox-4x32-10 words for counters ``first ..``."""
    counters = torch.arange(first, first + count, device=device, dtype=torch.int64)
    return torch.stack(philox4x32(counters, key), dim=1)


def _box_muller(wa: torch.Tensor, wb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    u1 = ((wa >> 8) + 1).to(torch.float32) * _INV_2_24  # (0, 1]: log never sees 0
    u2 = (wb >> 8).to(torch.float32) * _INV_2_24  # [0, 1)
    rad = torch.sqrt(-2.0 * torch.log(u1))
    ang = u2 * torch.tensor(TWO_PI_F32, dtype=torch.float32, device=u2.device)
    return rad * torch.cos(ang), rad * torch.sin(ang)


def fill_philox_gaussian_(out: torch.Tensor, *, seed: int, key: int, offset: int = 0) -> torch.Tensor:
    """Elements ``[offset, offset + out.numel())`` of the Philox/Box-Muller Gaussian stream of
    the tensor with key ``key`` at step seed ``seed``, into the float32 tensor ``out``
    (~38 ms per million normals on 2 CPU cores, 10x a native ``normal_``; fast on CUDA).
    Chunk-safe: any split of a tensor into (offset, length) requests gives the same values."""
    n = out.numel()
    first = offset // GAUSSIAN_GROUP
    last = (offset + n + GAUSSIAN_GROUP - 1) // GAUSSIAN_GROUP
    w = philox_words(first, last - first, philox_key(seed, key), out.device)
    n0, n1 = _box_muller(w[:, 0], w[:, 1])
    n2, n3 = _box_muller(w[:, 2], w[:, 3])
    z = torch.stack([n0, n1, n2, n3], dim=1).reshape(-1)
    start = offset - first * GAUSSIAN_GROUP
    out.view(-1).copy_(z[start : start + n])
    return out


def round_words(
    numel: int, *, round_seed: int, key: int, offset: int = 0, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The stochastic-rounding words (uint32 values in int64) of elements ``[offset, offset +
    numel)`` of the tensor with key ``key``."""
    first = offset // 4
    last = (offset + numel + 3) // 4
    w = philox_words(first, last - first, round_key(round_seed, key), device).reshape(-1)
    start = offset - first * 4
    return w[start : start + numel]
