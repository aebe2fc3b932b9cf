"""The one collective of a ZO step: the projected gradients averaged over ranks.

A step communicates ``grads_per_step + 1`` float64 values (the estimator's projected
gradients and a skip flag), whatever the model's size; every rank then applies the same
update from the same seeds, so the weights stay bit-identical without a broadcast.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..config import ZOConfig

__all__ = ["world_size", "all_reduce_projected_grads"]


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
