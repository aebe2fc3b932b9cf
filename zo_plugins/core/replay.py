"""Rebuild fine-tuned weights from the starting weights and a trajectory log."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..quant import quantized_scales
from .noise import STREAM_VERSION
from .optimizer import ZOOptimizer
from .rounding import HALF_DTYPES
from .trajectory import TrajectoryError, read_log, weights_hash

__all__ = ["replay"]

logger = logging.getLogger("zo_plugins")


def replay(
    model: nn.Module,
    log: str | os.PathLike,
    *,
    steps: int | None = None,
    mask_fn: Callable[[str, torch.Tensor, int], torch.Tensor | None] | None = None,
    allow_version_mismatch: bool = False,
) -> nn.Module:
    """Apply the steps recorded in trajectory ``log`` to ``model`` in place and return it.

    ``model`` must hold the run's starting weights (checked against the log's hash) and the
    same trainable parameter names (for a run that trained quantization scales: the same
    quantized model, freshly loaded).  No forward pass runs: each step repeats the recorded
    in-place perturbation passes (so their rounding matches) and the update, which makes the
    result bit-identical to the trained weights on the same backend and dtype.  When the log
    is complete (the run closed it), the replayed weights are checked against the hash of the
    run's final weights; a log without its end record (a run that was cut) replays with a
    warning that says how many steps it holds.

    ``steps`` replays only the first ``steps`` steps.  A run trained with ``mask_fn`` needs the
    same function here.  Logs written by any library version replay as long as their
    direction streams (``stream_version``) are this library's; ``allow_version_mismatch``
    replays a log with other streams anyway (the result will differ).
    """
    trajectory = read_log(log)
    header, records = trajectory.header, trajectory.records
    named = dict(model.named_parameters())
    named.update({q.name: q.tensor for q in quantized_scales(model)})  # a quantized model's scales
    stream_version = header.get("stream_version", 1)
    if stream_version == 1 and STREAM_VERSION == 2 and not _rounds_half_precision(header, named):
        stream_version = STREAM_VERSION  # streams 1 and 2 differ only in half-precision stochastic rounding
    if stream_version != STREAM_VERSION and not allow_version_mismatch:
        raise TrajectoryError(
            f"{log} was written with direction stream version {stream_version} and this library draws "
            f"version {STREAM_VERSION}: the directions differ, so replay cannot rebuild the weights. Replay it "
            "with the zo_plugins release that wrote it, or pass allow_version_mismatch=True (zo-replay "
            "--allow-version-mismatch) to replay anyway."
        )
    backend = header.get("backend")
    if backend not in ("torch", "triton"):
        raise TrajectoryError(f"{log} was written by an unknown backend {backend!r}.")
    if backend == "triton" and header.get("stream") == "gaussian-philox" and "triton_interpreted" in header:
        # compiled kernels draw Box-Muller through libdevice, the interpreter through numpy:
        # the last ulps differ, so a Gaussian Triton run replays only where it ran
        here = os.environ.get("TRITON_INTERPRET", "0") == "1"
        if here != header["triton_interpreted"] and not allow_version_mismatch:
            where = (
                "under the Triton interpreter"
                if header["triton_interpreted"]
                else "on a GPU (compiled kernels)"
            )
            raise TrajectoryError(
                f"{log} is a Gaussian run of the Triton kernels {where}; its directions differ from this "
                "environment's in the last ulps of log/sin/cos, so replay it where it ran (or record with "
                "distribution='rademacher', which is bit-exact everywhere). allow_version_mismatch=True "
                "replays anyway."
            )
    recorded_mask = header.get("mask_fn")
    if recorded_mask is not None and mask_fn is None:
        raise TrajectoryError(
            f"{log} was trained with mask_fn={recorded_mask}: pass the same function, "
            "replay(model, log, mask_fn=...), to replay it."
        )
    if recorded_mask is None and mask_fn is not None:
        raise TrajectoryError(f"{log} was trained without a mask_fn; do not pass one to replay it.")
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
    config.update(offload=None, offload_dir=None, schedule="per-forward")  # replay runs no forward
    in_place = _in_place_names(header, named)
    config["perturbation"] = "out-of-place" if not in_place else "in-place"
    mixed = bool(in_place) and any(n not in in_place for names in header["groups"] for n in names)
    if mixed:
        config["perturbation"] = "out-of-place"
    opt = ZOOptimizer(groups, lr=0.0, model=model, mask_fn=mask_fn, **config)
    if mixed:  # the run perturbed some tensors in place (float32 under v1's 'auto') and others not
        for spec in opt.specs():
            spec.in_place = spec.name in in_place
    got = weights_hash((s.name, s.param) for s in opt.specs())
    if got != header["base_hash"]:
        raise TrajectoryError(
            f"The model's trainable weights do not match the starting weights of {log} "
            f"(hash {got[:12]} vs {header['base_hash'][:12]}): replay needs the exact base model."
        )
    todo = records if steps is None else records[:steps]
    for rec in todo:
        opt.replay_step(rec)
    if trajectory.end is None:
        logger.warning(
            "%s has no end record: the run that wrote it did not finish (or is still running). "
            "Replayed the %d step(s) it holds.",
            log,
            len(todo),
        )
    elif steps is None or steps >= len(records):
        final = weights_hash((s.name, s.param) for s in opt.specs())
        if final != trajectory.end["final_hash"]:
            raise TrajectoryError(
                f"Replaying {log} did not reproduce the run's final weights (hash {final[:12]} vs "
                f"{trajectory.end['final_hash'][:12]}): the replay ran on another backend, device or "
                "dtype, or the log does not belong to this base model."
            )
    return model


def _in_place_names(header: dict[str, Any], named: dict[str, torch.Tensor]) -> set[str]:
    """The tensors the run perturbed in place."""
    if "in_place" in header:
        return set(header["in_place"])
    # format 1 logs: 'auto' meant in place for float32/float64, out of place for half precision
    mode = header["config"].get("perturbation", "auto")
    names = {n for g in header["groups"] for n in g}
    if mode == "out-of-place":
        return set()
    cfg = header["config"]
    if cfg.get("estimator") == "forward-grad" or (
        cfg.get("sparsity") and cfg.get("sparsity_mode") == "magnitude"
    ):
        return set()
    if mode == "in-place":
        return names
    return {n for n in names if named[n].dtype not in HALF_DTYPES}


def _rounds_half_precision(header: dict[str, Any], named: dict[str, torch.Tensor]) -> bool:
    """Whether the run rounded bf16/fp16 updates stochastically (what stream 1 drew differently)."""
    if not header["config"].get("stochastic_rounding", True):
        return False
    return any(n in named and named[n].dtype in HALF_DTYPES for g in header["groups"] for n in g)
