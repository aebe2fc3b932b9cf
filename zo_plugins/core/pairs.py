"""Perturbation parallelism (DistZO2): ``ZOConfig(perturbation_parallel=True)``.

With ``2k`` processes, ranks ``2p`` and ``2p + 1`` form pair ``p``: on the same batch and at
the same time, rank ``2p`` evaluates ``L(theta + eps z)`` and rank ``2p + 1`` evaluates
``L(theta - eps z)``, so a step costs each rank one forward per direction instead of two.  The
``k`` pairs are data parallel: pair ``p`` reads data shard ``p`` of ``k`` (``pair_sampler``,
``data_shard``; ``ZODDPStrategy`` and ``ZOTrainer`` shard per pair themselves).

**The exchange is the step's one collective.**  Each rank accumulates its own probe losses
over the step's micro-batches (weighted by the factor the framework back-propagates, as the
projected gradient is) and puts them in its own slots of one float64 vector,
``world * n_queries + world + 1`` values long (the losses, an RNG fingerprint per rank, a skip
flag); one all-reduce (a sum in which every slot has one non-zero term, so it is exact) hands
every rank all the losses.  Every rank then forms ``g_p = (L+_p - L-_p) / 2eps`` for each pair
in the same order and averages over pairs, so all ranks apply the identical update.  With one
micro-batch per step ``g_p`` is the single-process projected gradient on that batch bit for
bit (the same float64 expression of the same float32 losses) and the mean over ``k = 2`` pairs
is DDP-ZO's mean; with gradient accumulation the pair subtracts factor-weighted *sums* of
losses, which equals the single-process accumulation to float64 rounding of those sums
(~1e-16 of the losses, i.e. ~1e-12 relative to the projected gradient at eps = 1e-3).

**Both ranks of a pair must see the same dropout masks.**  At the first step every odd rank
adopts its pair's even rank's RNG state (CPU and CUDA; one all-gather of the states, once);
from then on both consume the RNG identically.  Every step, each rank also sends a 48-bit
fingerprint of the RNG states its forwards started from (only forwards that drew random
numbers count) and a pair whose fingerprints differ stops the run before the update, naming
the cause -- a silent mismatch would add mask noise ~4x the signal (DESIGN.md, measured).

**In-place perturbation** (float32 tensors without a model): both ranks walk the single-process
sequence ``+eps z``, ``-2eps z`` (each runs its forward at its own point of it), so both end
each step with the same bits as a one-process in-place run.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ZOConfig
from .noise import mix64
from .registry import Estimator

__all__ = ["PairLayout", "pair_layout", "data_shard", "pair_sampler", "PairParallel"]

_FINGERPRINT_BITS = 48  # exact in a float64 slot


@dataclass(frozen=True)
class PairLayout:
    """Where this rank sits: pair ``rank // 2``, role ``rank % 2`` (0: +eps, 1: -eps)."""

    rank: int
    world: int

    @property
    def pair(self) -> int:
        return self.rank // 2

    @property
    def pairs(self) -> int:
        return self.world // 2

    @property
    def role(self) -> int:
        return self.rank % 2

    @property
    def sign(self) -> float:
        return 1.0 if self.role == 0 else -1.0

    @property
    def leader(self) -> int:
        return 2 * self.pair


def pair_layout() -> PairLayout:
    """This process's place among the pairs; raises unless torch.distributed runs an even
    number (>= 2) of processes."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(
            "ZOConfig.perturbation_parallel=True needs torch.distributed with an even number of processes "
            "(launch with torchrun --nproc_per_node 2k, accelerate launch --num_processes 2k, or Lightning "
            "devices=2k); torch.distributed is not initialised in this process."
        )
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2 or world % 2:
        raise ValueError(
            f"ZOConfig.perturbation_parallel=True pairs the processes (one evaluates theta + eps z, its partner "
            f"theta - eps z); the world size is {world}. Launch an even number of processes (2, 4, 8, ...)."
        )
    return PairLayout(rank, world)


def data_shard(perturbation_parallel: bool | ZOConfig = True) -> tuple[int, int]:
    """``(num_replicas, rank)`` for a ``DistributedSampler``: the data is sharded per pair under
    perturbation parallelism (both ranks of a pair read the same batches), per rank otherwise;
    ``(1, 0)`` outside torch.distributed."""
    import torch.distributed as dist

    on = (
        perturbation_parallel.perturbation_parallel
        if isinstance(perturbation_parallel, ZOConfig)
        else bool(perturbation_parallel)
    )
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    if not on:
        return dist.get_world_size(), dist.get_rank()
    layout = pair_layout()
    return layout.pairs, layout.pair


def pair_sampler(dataset: Any, **kwargs: Any) -> torch.utils.data.DistributedSampler:
    """A ``DistributedSampler`` that shards ``dataset`` per pair (``shuffle``, ``seed``,
    ``drop_last`` as for ``DistributedSampler``): what a torchrun loop around ``ZOOptimizer``
    with ``perturbation_parallel=True`` hands its ``DataLoader``."""
    num_replicas, rank = data_shard(True)
    return torch.utils.data.DistributedSampler(dataset, num_replicas=num_replicas, rank=rank, **kwargs)


def _rng_fingerprint(rng: Any) -> int:
    h = hashlib.blake2b(digest_size=8)
    h.update(rng.cpu.numpy().tobytes())
    for dev in sorted(rng.cuda, key=str):
        h.update(rng.cuda[dev].cpu().numpy().tobytes())
    return int.from_bytes(h.digest(), "little") & ((1 << _FINGERPRINT_BITS) - 1)


def _rng_drawn(rng: Any) -> bool:
    """True if a forward since ``rng`` was saved drew random numbers (CPU or CUDA)."""
    if not torch.equal(torch.get_rng_state(), rng.cpu):
        return True
    return any(not torch.equal(torch.cuda.get_rng_state(d), s) for d, s in rng.cuda.items())


class PairParallel:
    """The perturbation-parallel half of a ``ZOOptimizer``: its estimator and its collective."""

    def __init__(self, config: ZOConfig) -> None:
        self.config = config
        self.layout = pair_layout()
        self.synced = False
        self.fingerprint = 0
        self.losses: tuple[float, float] | None = None
        """Mean over pairs of the last step's factor-weighted L+ and L- (last direction)."""
        self.estimator = Estimator(
            "spsa",
            self.probe,
            forwards_per_step=lambda cfg: cfg.n_queries,
            help="spsa with the two forwards on the two ranks of a pair (perturbation_parallel=True)",
        )

    # ------------------------------------------------------------------ the probe (one rank's half)
    def probe(self, p: Any) -> None:
        """This rank's half of spsa: its forward at ``theta + sign * eps z`` for every direction.
        ``est.projected_grads`` holds the raw losses (the collective forms the gradients)."""
        if not self.synced:
            self._sync_rng(p)
        est, eps, role = p.est, p.eps, self.layout.role
        in_place = any(s.in_place for s in p.plan.active)
        for seed in p.plan.seeds:
            if role == 1 and in_place:  # walk the one-process sequence: +eps first (no forward here)
                p.perturber.shift(p.plan, p.along(seed, eps))
            loss = p.loss(p.along(seed, eps * self.layout.sign))
            if role == 0 and in_place:  # ... then -eps (the partner's forward), so both ranks round alike
                p.perturber.shift(p.plan, p.along(seed, -eps))
            est.losses_plus.append(loss if role == 0 else float("nan"))
            est.losses_minus.append(loss if role == 1 else float("nan"))
            if not math.isfinite(loss):
                est.skipped = True
                return
            est.projected_grads.append(loss)
        if p.rng is not None and _rng_drawn(p.rng):
            self.fingerprint = mix64(self.fingerprint, _rng_fingerprint(p.rng)) & (
                (1 << _FINGERPRINT_BITS) - 1
            )

    def _sync_rng(self, p: Any) -> None:
        """Once: every rank adopts its pair leader's RNG states (then both draw the same masks)."""
        import torch.distributed as dist

        mine = {"cpu": torch.get_rng_state(), "cuda": {}}
        if p.rng is not None:
            mine["cuda"] = {str(d): torch.cuda.get_rng_state(d) for d in p.rng.cuda}
        states: list[Any] = [None] * self.layout.world
        dist.all_gather_object(states, mine)
        lead = states[self.layout.leader]
        if self.layout.role == 1:
            torch.set_rng_state(lead["cpu"])
            for d, s in lead["cuda"].items():
                torch.cuda.set_rng_state(s, torch.device(d))
        if p.rng is not None:  # the probe saved the state before the sync: take it again
            p.rng = type(p.rng)(p.plan.active)
        self.synced = True

    # ------------------------------------------------------------------ the collective
    def reduce(self, values: Sequence[float], skipped: bool, *, n: int) -> tuple[list[float], bool]:
        """The step's all-reduce: ``values`` are this rank's (factor-weighted, accumulated)
        probe losses, one per direction; returns the projected gradients every rank applies,
        averaged over pairs, and whether the step is skipped (a non-finite loss anywhere)."""
        import torch.distributed as dist

        lay, world = self.layout, self.layout.world
        ok = len(values) == n and not skipped
        buf = [0.0] * (world * n + world + 1)
        if ok:
            buf[lay.rank * n : (lay.rank + 1) * n] = [float(v) for v in values]
        buf[world * n + lay.rank] = float(self.fingerprint)
        buf[-1] = 0.0 if ok else 1.0
        self.fingerprint = 0
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
        t = torch.tensor(buf, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        out = t.tolist()
        self.losses = None
        if out[-1] > 0:
            return [], True
        prints = out[world * n : world * n + world]
        bad = [q for q in range(lay.pairs) if prints[2 * q] != prints[2 * q + 1]]
        if bad:
            q = bad[0]
            raise RuntimeError(
                f"perturbation_parallel: ranks {2 * q} and {2 * q + 1} (pair {q}) ran their forwards from different "
                "RNG states, so their dropout masks differ and the difference of their losses is mostly mask "
                "noise. Both ranks of a pair must draw the same random numbers: seed every rank alike "
                "(torch.manual_seed / TrainingArguments.seed / seed_everything, not rank-dependent), do not "
                "draw random numbers on one rank only, or use ZOConfig(dropout='eval'). The weights were not "
                "updated in this step."
            )
        sign = -1.0 if self.config.maximize else 1.0
        eps = self.config.eps
        grads = []
        for d in range(n):
            total = 0.0
            for q in range(lay.pairs):  # the same order on every rank: identical updates
                lp, lm = out[2 * q * n + d], out[(2 * q + 1) * n + d]
                total += sign * (lp - lm) / (2 * eps)
            grads.append(total / lay.pairs)
        last = n - 1
        self.losses = (
            sum(out[2 * q * n + last] for q in range(lay.pairs)) / lay.pairs,
            sum(out[(2 * q + 1) * n + last] for q in range(lay.pairs)) / lay.pairs,
        )
        return grads, False
