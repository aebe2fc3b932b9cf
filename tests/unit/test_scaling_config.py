"""Many-process settings checked in one process: perturbation parallelism refused where it
cannot run (before any weight changes), data sharding per pair, and FSDP2 on a one-rank mesh
(the sharded path with trivial offsets: bit-identical to the unsharded step; the refusals).
The multi-process equalities are in tests/distributed/."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from zo_testing import assert_bit_identical, params_snapshot, tiny_batch, tiny_hf_model

from zo_plugins import ZOConfig, ZOOptimizer
from zo_plugins.distributed import data_shard, pair_sampler, shard_dataloader_per_pair


@pytest.fixture
def fake_world(request):
    """A fake process group of ``request.param = (world, rank)`` (no communication)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    world, rank = request.param
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    yield world, rank
    dist.destroy_process_group()


@pytest.fixture
def one_rank():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


# ----------------------------------------------------------------------------- perturbation parallelism
@pytest.mark.parametrize(
    "kw, match",
    [
        ({"estimator": "forward"}, "estimator='forward' has no such pair"),
        ({"estimator": "cge"}, "estimator='cge' has no such pair"),
        ({"estimator": "rank", "n_queries": 2}, "estimator='rank' has no such pair"),
        ({"optimizer": "zo-sgd-conservative"}, "zo-sgd-conservative"),
        ({"all_reduce": False}, "needs all_reduce=True"),
        ({"offload": "cpu"}, "runs both forwards in one visit"),
        ({"schedule": "one-visit"}, "runs both forwards in one visit"),
    ],
)
def test_perturbation_parallel_refuses_what_has_no_pair(kw, match):
    with pytest.raises(ValueError, match=match):
        ZOConfig(perturbation_parallel=True, **kw)
    with pytest.raises(ValueError, match="perturbation_parallel=1 is invalid"):
        ZOConfig(perturbation_parallel=1)


def test_perturbation_parallel_needs_torch_distributed():
    model = tiny_hf_model("opt")
    before = params_snapshot(model)
    with pytest.raises(ValueError, match="torch.distributed is not initialised"):
        ZOOptimizer(model, lr=1e-3, perturbation_parallel=True)
    assert_bit_identical(before, params_snapshot(model))
    assert data_shard(True) == (1, 0)


@pytest.mark.parametrize("fake_world", [(3, 1), (1, 0)], indirect=True)
def test_perturbation_parallel_needs_an_even_world(fake_world):
    world, _ = fake_world
    with pytest.raises(ValueError, match=f"the world size is {world}. Launch an even number"):
        ZOOptimizer(tiny_hf_model("opt"), lr=1e-3, perturbation_parallel=True)


@pytest.mark.parametrize("fake_world", [(4, 2)], indirect=True)
def test_data_is_sharded_per_pair(fake_world):
    from accelerate.data_loader import BatchSamplerShard

    data = list(range(40))
    assert data_shard(True) == (2, 1) and data_shard(False) == (4, 2)
    assert list(pair_sampler(data, shuffle=False)) == list(
        torch.utils.data.DistributedSampler(data, 2, 1, False)
    )
    # a plain loader over a DistributedSampler of all ranks
    loader = torch.utils.data.DataLoader(
        data, batch_size=2, sampler=torch.utils.data.DistributedSampler(data, 4, 2)
    )
    ref = torch.utils.data.DataLoader(
        data, batch_size=2, sampler=torch.utils.data.DistributedSampler(data, 2, 1)
    )
    shard_dataloader_per_pair(loader)
    assert [b.tolist() for b in loader] == [b.tolist() for b in ref] and len(loader) == len(ref) == 10

    # accelerate's prepared map-style loader
    def accel(n, i):
        bs = torch.utils.data.BatchSampler(torch.utils.data.SequentialSampler(data), 2, False)
        return torch.utils.data.DataLoader(
            data, batch_sampler=BatchSamplerShard(bs, num_processes=n, process_index=i)
        )

    loader = shard_dataloader_per_pair(accel(4, 2))
    assert [b.tolist() for b in loader] == [b.tolist() for b in accel(2, 1)] and len(loader) == 10
    with pytest.raises(ValueError, match="cannot find how DataLoader shards its data"):
        shard_dataloader_per_pair(torch.utils.data.DataLoader(data, batch_size=2))


# ----------------------------------------------------------------------------- FSDP2 on one rank
def _sharded_opt(**kw):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = tiny_hf_model("opt", dropout=0.1)
    ref = copy.deepcopy(model)
    mesh = init_device_mesh("cpu", (1,))
    for layer in model.model.decoder.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, ref


def test_fsdp2_one_rank_step_equals_the_unsharded_step(one_rank):
    model, ref = _sharded_opt()
    b = tiny_batch("opt")
    model(**b)  # the root group stays gathered after a forward; the optimizer must reshard it
    opt = ZOOptimizer(model, lr=1e-2, all_reduce=False)
    assert all(type(s.source).__name__ == "DTensor" for s in opt.specs())
    o_ref = ZOOptimizer(ref, lr=1e-2, all_reduce=False)
    for step in range(2):
        torch.manual_seed(step)
        o_ref.step(lambda: ref(**b).loss)
        torch.manual_seed(step)
        opt.step(lambda: model(**b).loss)
    assert opt.last_step.projected_grads == o_ref.last_step.projected_grads
    assert opt.last_step.grad_norm == o_ref.last_step.grad_norm  # whole-tensor sizes, not the shards'
    assert_bit_identical(params_snapshot(ref), {n: p.full_tensor() for n, p in model.named_parameters()})
    # state keyed by the DTensor parameters: torch.optim's state_dict works
    assert len(ZOOptimizer(model, lr=1e-2, optimizer="zo-adam").state_dict()["param_groups"][0]["params"]) > 0


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"estimator": "cge"}, "estimator='cge' cannot run on sharded"),
        ({"estimator": "forward-grad"}, "estimator='forward-grad' cannot run on sharded"),
        ({"distribution": "sphere"}, "distribution='sphere' cannot run on sharded"),
        ({"sparsity": 0.5}, "sparsity_mode='magnitude' cannot run on sharded"),
        ({"trajectory_path": "never-written.jsonl"}, "trajectory_path cannot be recorded on sharded"),
        ({"mask_fn": lambda n, p, s: None}, "mask_fn cannot run on sharded"),
    ],
)
def test_fsdp2_refuses_what_needs_the_whole_tensor(one_rank, tmp_path, kw, match):
    model, _ = _sharded_opt()
    if "trajectory_path" in kw:
        kw = {"trajectory_path": str(tmp_path / kw["trajectory_path"])}
    with pytest.raises(ValueError, match=match):
        ZOOptimizer(model, lr=1e-3, **kw)
    assert not (tmp_path / "never-written.jsonl").exists()


@pytest.mark.parametrize("kw", [{"schedule": "one-visit"}, {"offload": "cpu"}])
def test_fsdp2_shards_refuse_the_one_visit_schedule(one_rank, kw):
    model, _ = _sharded_opt()
    before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="cannot run on FSDP2 shards"):
        ZOOptimizer(model, lr=1e-3, **kw)
    assert_bit_identical(before, {n: p.full_tensor() for n, p in model.named_parameters()})
    assert not hasattr(model, "_zo_offload")


def test_fsdp1_is_refused_with_the_fsdp2_way(one_rank):
    from torch.distributed.fsdp import FullyShardedDataParallel

    model = FullyShardedDataParallel(tiny_hf_model("opt"), device_id=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"FSDP1 .* Shard with FSDP2 instead"):
        ZOOptimizer(model, lr=1e-3)


def test_callbacks_refuse_pairs_where_the_loader_cannot_follow():
    """The pure HF callback cannot re-shard the Trainer's loader (the Trainer sizes its epochs
    before callbacks run) and ZOLightningCallback cannot change the strategy's sampler: both
    name the class that can."""
    from types import SimpleNamespace

    pytest.importorskip("transformers")
    from zo_plugins.integrations.hf import _check_pair_sharded

    with pytest.raises(ValueError, match="Use zo_plugins.ZOTrainer"):
        _check_pair_sharded(torch.utils.data.DataLoader(list(range(4))))
    pytest.importorskip("lightning")
    from lightning.pytorch.strategies import SingleDeviceStrategy

    from zo_plugins.lightning import ZOLightningCallback

    cb = ZOLightningCallback(perturbation_parallel=True)
    with pytest.raises(ValueError, match=r"ZODDPStrategy\(perturbation_parallel=True\)"):
        cb.setup(SimpleNamespace(strategy=SingleDeviceStrategy("cpu")), None, "fit")
