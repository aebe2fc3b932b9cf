"""One rank of a docs block marked ``<!-- snippet: launch=N -->``, run under torchrun by
test_snippets.py::test_python_block_runs:

    python -m torch.distributed.run --nproc_per_node N snippet_worker.py PAGE LINE OUT

The block (and the blocks that ``continue`` it) runs as written in its ``setup=`` namespace,
in ``OUT/rank<R>/``. A block that starts its own process group gets a namespace built as for
one process (its ``TrainingArguments`` start none); a ``trainer`` the block built but did not
train is trained for the capped steps. The rank then saves the model's weights and the
starting weights (``build_model()``, seeded alike on every rank) to ``OUT/rank<R>.pt`` for the
test to compare across ranks.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import torch  # noqa: E402
from docs_snippets import extract_blocks, python_groups  # noqa: E402
from snippet_namespaces import NAMESPACES, capped_post_init  # noqa: E402

_DIST_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK")


def _cap_training_arguments() -> None:
    from transformers import TrainingArguments

    TrainingArguments.__post_init__ = capped_post_init(TrainingArguments.__post_init__)


def _namespace(setup: str, starts_its_own_group: bool) -> dict:
    if not starts_its_own_group:
        return NAMESPACES[setup]()
    saved = {k: os.environ.pop(k) for k in _DIST_ENV if k in os.environ}
    try:
        return NAMESPACES[setup]()
    finally:
        os.environ.update(saved)


def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    module = getattr(module, "module", module)  # DistributedDataParallel
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def main(page: str, line: int, out: str) -> None:
    group = next(g for g in python_groups(extract_blocks(Path(page))) if g[0].line == line)
    rank = int(os.environ["RANK"])
    work = Path(out) / f"rank{rank}"
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(work)
    _cap_training_arguments()
    torch.manual_seed(0)
    setup = group[0].directives.get("setup", "tiny")
    ns = _namespace(setup, any("init_process_group" in b.code for b in group))
    start = _weights(ns["build_model"]())
    for block in group:
        exec(compile(block.code, block.id, "exec"), ns)
    trainer = ns.get("trainer")
    if trainer is not None and trainer.state.global_step == 0:
        trainer.train()
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    torch.save(
        {"rank": rank, "world": world, "params": _weights(ns["model"]), "start": start},
        Path(out) / f"rank{rank}.pt",
    )
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3])
