"""Helpers for many-process ZO runs: data sharding per pair (perturbation parallelism) and the
FSDP2 facts a loop needs.

* ``pair_sampler(dataset, shuffle=..., seed=...)`` -- a ``DistributedSampler`` sharding
  ``dataset`` per pair of ranks, for a torchrun loop around ``ZOOptimizer(...,
  perturbation_parallel=True)``;
* ``data_shard(perturbation_parallel)`` -- ``(num_replicas, rank)`` for your own sampler;
* ``shard_dataloader_per_pair(loader)`` -- re-shard a loader prepared by accelerate
  (``Accelerator.prepare``) or built on a ``DistributedSampler`` so both ranks of a pair read
  the same batches (``ZOTrainer`` calls it on the Trainer's training loader);
* ``is_sharded``, ``fsdp_modules``, ``reshard_all`` -- FSDP2 (``core.sharding``).
"""

from __future__ import annotations

import math
from typing import Any

from .core.pairs import PairLayout, data_shard, pair_layout, pair_sampler
from .core.sharding import fsdp_modules, is_sharded, reshard_all

__all__ = [
    "PairLayout",
    "pair_layout",
    "data_shard",
    "pair_sampler",
    "shard_dataloader_per_pair",
    "is_sharded",
    "fsdp_modules",
    "reshard_all",
]

PAIR_SHARDED = "_zo_pair_sharded"
"""Attribute set on a loader that ``shard_dataloader_per_pair`` re-sharded."""


def shard_dataloader_per_pair(dataloader: Any) -> Any:
    """Make ``dataloader`` shard its data per pair of ranks (in place; returns it): pair ``p``
    of ``k`` reads shard ``p`` of ``k``, so ranks ``2p`` and ``2p + 1`` get the same batches.

    Understands accelerate's prepared loaders (``BatchSamplerShard`` for map-style datasets,
    ``IterableDatasetShard`` for iterable ones) and plain ``DataLoader`` objects over a
    ``torch.utils.data.DistributedSampler``.  Call it before the loader is iterated (and before
    its length is read to size an epoch).  Raises ``ValueError`` for a loader it cannot
    re-shard, naming what it found."""
    import torch.utils.data as tud

    if getattr(dataloader, PAIR_SHARDED, False):
        return dataloader
    pairs, pair = data_shard(True)
    kind = type(dataloader).__name__
    try:
        from accelerate.data_loader import BatchSamplerShard, DataLoaderDispatcher, IterableDatasetShard
    except ImportError:  # pragma: no cover - accelerate absent: plain torch loaders only
        BatchSamplerShard = DataLoaderDispatcher = IterableDatasetShard = ()  # type: ignore[assignment]
    if DataLoaderDispatcher and isinstance(dataloader, DataLoaderDispatcher):
        raise ValueError(
            "perturbation_parallel: this accelerate loader dispatches batches from rank 0 (dispatch_batches=True, "
            "the default for iterable datasets); it cannot be sharded per pair. Prepare it with "
            "DataLoaderConfiguration(dispatch_batches=False) (Trainer: accelerator_config={'dispatch_batches': "
            "False})."
        )
    batch_sampler = getattr(dataloader, "batch_sampler", None)
    dataset = getattr(dataloader, "dataset", None)
    sampler = getattr(dataloader, "sampler", None)
    if BatchSamplerShard and isinstance(batch_sampler, BatchSamplerShard):
        batch_sampler.num_processes, batch_sampler.process_index = pairs, pair
    elif IterableDatasetShard and isinstance(dataset, IterableDatasetShard):
        dataset.num_processes, dataset.process_index = pairs, pair
    elif isinstance(sampler, tud.DistributedSampler):
        _reshard_distributed_sampler(sampler, pairs, pair)
    elif isinstance(getattr(batch_sampler, "sampler", None), tud.DistributedSampler):
        _reshard_distributed_sampler(batch_sampler.sampler, pairs, pair)
    else:
        raise ValueError(
            f"perturbation_parallel: cannot find how {kind} shards its data (no accelerate BatchSamplerShard / "
            "IterableDatasetShard, no DistributedSampler). Build it with "
            "sampler=zo_plugins.distributed.pair_sampler(dataset)."
        )
    setattr(dataloader, PAIR_SHARDED, True)
    return dataloader


def _reshard_distributed_sampler(sampler: Any, num_replicas: int, rank: int) -> None:
    """Re-derive ``DistributedSampler``'s per-rank sizes for ``num_replicas`` (its __init__ formula)."""
    sampler.num_replicas, sampler.rank = num_replicas, rank
    n = len(sampler.dataset)
    if sampler.drop_last and n % num_replicas:
        sampler.num_samples = math.ceil((n - num_replicas) / num_replicas)
    else:
        sampler.num_samples = math.ceil(n / num_replicas)
    sampler.total_size = sampler.num_samples * num_replicas
