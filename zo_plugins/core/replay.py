"""Rebuild fine-tuned weights from the starting weights and a trajectory log."""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .optimizer import ZOOptimizer
from .trajectory import TrajectoryError, read_trajectory, weights_hash

__all__ = ["replay"]


def replay(
    model: nn.Module,
    log: str | os.PathLike,
    *,
    allow_version_mismatch: bool = False,
    steps: int | None = None,
) -> nn.Module:
    """Apply the steps recorded in trajectory ``log`` to ``model`` in place and return it.

    ``model`` must hold the run's starting weights (checked against the log's hash) and the
    same trainable parameter names.  No forward pass runs: each step repeats the recorded
    in-place perturbation passes (so their rounding matches) and the update, which makes the
    result bit-identical to the trained weights on the same backend and dtype.  A log written
    by another library version is refused unless ``allow_version_mismatch=True``; ``steps``
    replays only the first ``steps`` steps.
    """
    from .. import __version__

    header, records = read_trajectory(log)
    if header["library_version"] != __version__ and not allow_version_mismatch:
        raise TrajectoryError(
            f"{log} was written by zo_plugins {header['library_version']} and this is {__version__}; "
            "the direction stream may differ. Pass allow_version_mismatch=True (zo-replay "
            "--allow-version-mismatch) to replay anyway."
        )
    backend = header.get("backend")
    if backend not in ("torch", "triton"):
        raise TrajectoryError(f"{log} was written by an unknown backend {backend!r}.")
    named = dict(model.named_parameters())
    groups: list[dict[str, Any]] = []
    for names in header["groups"]:
        missing = [n for n in names if n not in named]
        if missing:
            raise TrajectoryError(
                f"The model has no parameter {missing[0]!r} that the log trained; load the same "
                "architecture (and the same PEFT adapter config) the run used."
            )
        groups.append({"params": [named[n] for n in names]})
    config = dict(header["config"], backend=backend)  # replay on the backend that trained
    opt = ZOOptimizer(groups, lr=0.0, model=model, **config)
    got = weights_hash((s.name, s.param) for s in opt.specs())
    if got != header["base_hash"]:
        raise TrajectoryError(
            f"The model's trainable weights do not match the starting weights of {log} "
            f"(hash {got[:12]} vs {header['base_hash'][:12]}): replay needs the exact base model."
        )
    for rec in records[:steps]:
        step = rec["step"]
        seeds = opt.seeds_for(step)
        opt._begin_step(step)
        for terms in rec["shifts"]:
            opt._shift_in_place([(seeds[int(q)], float(c)) for q, c in terms])
        for group, lr, wd in zip(opt.param_groups, rec["lr"], rec["wd"]):
            group["lr"], group["weight_decay"] = lr, wd
        if rec["skipped"]:
            opt.skip(step=step)
        else:
            opt.apply_update(rec["grads"], step=step)
    return model
