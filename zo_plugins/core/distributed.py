"""The one collective of a ZO step: the projected gradients averaged over ranks.

A step communicates ``grads_per_step + 1`` float64 values (the estimator's projected
gradients and a skip flag), whatever the model's size; every rank then applies the same
update from the same seeds, so the weights stay bit-identical without a broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import ZOConfig

__all__ = ["world_size", "all_reduce_projected_grads", "all_reduce_mean", "check_launch"]


def world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_projected_grads(
    grads: Sequence[float], skipped: bool, config: ZOConfig, *, n: int | None = None
) -> tuple[list[float], bool]:
    """Average ``n`` projected gradients (default ``config.n_queries``; an estimator's
    ``grads_per_step``) over all ranks in one all-reduce; a step skipped on any rank is
    skipped on all.  Identity outside torch.distributed or with ``config.all_reduce=False``."""
    import torch.distributed as dist

    grads = list(grads)
    if (
        not (config.all_reduce and dist.is_available() and dist.is_initialized())
        or dist.get_world_size() == 1
    ):
        return grads, skipped
    n = config.n_queries if n is None else n
    ok = len(grads) == n and not skipped
    vals = grads if ok else [0.0] * n
    backend = dist.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    buf = torch.tensor(vals + [0.0 if ok else 1.0], dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    world = dist.get_world_size()
    if buf[-1].item() > 0:
        return [], True
    return [v / world for v in buf[:-1].tolist()], False


def all_reduce_mean(values: Sequence[float], config: ZOConfig) -> list[float]:
    """The mean over ranks of a few float64 values (identity on one process): decisions
    taken from losses -- 'zo-sgd-conservative' accepting a step -- must agree on every rank."""
    import torch.distributed as dist

    values = list(values)
    if (
        not (config.all_reduce and dist.is_available() and dist.is_initialized())
        or dist.get_world_size() == 1
    ):
        return values
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend() == "nccl"
        else torch.device("cpu")
    )
    buf = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(buf)
    return [v / dist.get_world_size() for v in buf.tolist()]


_CHECKED_LAUNCH = False


def _parent_cmdline() -> list[str]:
    import os

    try:
        with open(f"/proc/{os.getppid()}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except OSError:  # not Linux, or no /proc
        return []


def requested_processes(argv: list[str]) -> int | None:
    """The ``--num_processes`` / ``--num-processes`` an ``accelerate launch`` command line asked for."""
    for i, arg in enumerate(argv):
        for flag in ("--num_processes", "--num-processes"):
            if arg == flag and i + 1 < len(argv):
                value = argv[i + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            try:
                return int(value)
            except ValueError:
                return None
    return None


def check_launch() -> str | None:
    """Warn (once per process) when ``accelerate launch --cpu --num_processes N`` started a
    single process: without MPI, accelerate runs CPU jobs as one process and says nothing.
    Returns the warning, or None."""
    global _CHECKED_LAUNCH
    import logging
    import os

    if _CHECKED_LAUNCH:
        return None
    _CHECKED_LAUNCH = True
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in ("1", "true") or world_size() > 1:
        return None
    if "WORLD_SIZE" in os.environ and os.environ["WORLD_SIZE"] != "1":
        return None
    asked = requested_processes(_parent_cmdline())
    if asked is None or asked <= 1:
        return None
    msg = (
        f"accelerate launch --cpu --num_processes {asked} started ONE process: accelerate runs several "
        "CPU processes only through MPI, and this one trains alone (torch.distributed is not "
        "initialised). For data-parallel ZO on CPU use `accelerate launch --multi_gpu --num_processes "
        f"{asked}` (gloo) or `torchrun --nproc_per_node {asked}`."
    )
    logging.getLogger("zo_plugins").warning(msg)
    return msg
