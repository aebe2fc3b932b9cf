"""ZO on FSDP2 shards in two real CPU processes (gloo, torchrun): every rank perturbs and updates
only its local shard, with directions drawn at the shard's global offsets, and the sharded run
ends with the unsharded run's weights bit for bit -- plain ``fully_shard`` + ``ZOOptimizer``
(ten configurations, FZOO and HiZOO among them) and Lightning's ``ZOModelParallelStrategy`` (against ``ZODDPStrategy``
on the same data), all in the one launch of the ``two_rank_run`` fixture (conftest.py)."""

from __future__ import annotations

import pytest
import torch

STEPS = 3
pytestmark = pytest.mark.distributed


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def test_fsdp2_shards_train_to_the_unsharded_weights(two_rank_run):
    a, b = (r["fsdp-plain"] for r in two_rank_run)
    assert a.keys() == b.keys() and len(a) == 10
    for name, r in a.items():
        assert r["is_dtensor"], f"{name}: the model's parameters must be FSDP2 DTensor shards"
        assert r["backend"] == "torch"
        bad = [n for n in r["ref"] if not torch.equal(_bits(r["ref"][n]), _bits(r["sharded"][n]))]
        assert not bad, f"{name}: {len(bad)} tensors differ from the unsharded run, e.g. {bad[:3]}"
        moved = [n for n in r["init"] if not torch.equal(r["init"][n], r["sharded"][n])]
        assert len(moved) == len(r["init"]), f"{name}: every tensor must be trained"
        assert r["g"] == r["g_ref"] == b[name]["g"], f"{name}: the projected gradients must agree"
        assert r["all_reduces"] == STEPS, f"{name}: one small all-reduce per step (FSDP's gathers aside)"
        # each rank holds its own shard only
        assert r["local_numel"] + b[name]["local_numel"] == r["full_numel"]
    for name in ("out-of-place", "in-place", "bf16"):
        assert a[name]["mode"] == name.replace("bf16", "out-of-place")
    # the embedding's padding row (OPT: pad_token_id=1) is never perturbed nor updated
    for name in ("out-of-place", "in-place", "rademacher-adam"):
        r = a[name]
        emb = "model.decoder.embed_tokens.weight"
        assert torch.equal(r["sharded"][emb][1], r["init"][emb][1])
        assert not torch.equal(r["sharded"][emb][2], r["init"][emb][2])
    # uneven shards: 16 + 6 of the 22 elements (the 1-row tensors live on rank 0, rank 1's are empty)
    assert (a["mlp-uneven"]["local_numel"], b["mlp-uneven"]["local_numel"]) == (16, 6)
    # forward prefetching gathers before the hooks: the gathered copies are perturbed instead
    assert a["prefetch"]["fell_back"] and not a["out-of-place"]["fell_back"]


def test_lightning_model_parallel_strategy_equals_ddp(two_rank_run):
    pytest.importorskip("lightning")
    a, b = (r["fsdp-lightning"] for r in two_rank_run)
    for r in (a, b):
        assert r["fsdp2"]["is_dtensor"] == ["DTensor"] and r["ddp"]["is_dtensor"] == ["Parameter"]
        assert r["fsdp2"]["global_step"] == r["ddp"]["global_step"] == STEPS
        bad = [
            n for n in r["ddp"]["params"] if not torch.equal(r["ddp"]["params"][n], r["fsdp2"]["params"][n])
        ]
        assert not bad, f"ZOModelParallelStrategy differs from ZODDPStrategy in {bad[:3]}"
    assert all(torch.equal(a["fsdp2"]["params"][n], b["fsdp2"]["params"][n]) for n in a["fsdp2"]["params"])
