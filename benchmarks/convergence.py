"""Convergence of the ZO method family at a fixed budget of forward passes.

Task: the embedded default (SmolLM2-135M-Instruct + Rotten Tomatoes, prompt classification as
in ``examples/rotten_tomatoes.py``, whose data, model code and label-word loss this script
imports). Every
variant trains the same trainable set from the same weights on the same batches with a plain
``ZOOptimizer`` loop, and is evaluated on the same held-out split every ``budget/checkpoints``
forward passes. A forward pass is one closure call (SPSA: 2 per direction; forward
difference: n_queries + 1; ZO-RankSGD: n_queries; forward-grad: 1, each costing more than a
forward; the JSON records each run's training time).

    python benchmarks/convergence.py --budget 300 --variants mezo zo-adam momentum rank-q4 forward
    python benchmarks/convergence.py --variants mezo zo-adam --budget 200 --n-eval 200
    # exact, 0.12 s a forward instead of 2-3.5 s: every weight (or LoRA) of the last 2 layers, on
    # their cached inputs; each variant at 0.3/1/3x its lr
    python benchmarks/convergence.py --cached --trainable full --top-blocks 2 --lr 3e-4 --eps 1e-3 \
        --budget 300 --checkpoints 10 --lr-sweep 0.3 1 3

    # chosen cells of the variants x learning-rates grid, 3 seeds, then the goal table from the
    # runs (issue 14's sweep, all of it: scripts/convergence_issue14.sh; --merge-runs also merges
    # sittings, --step-times adds the seconds ratio at one load from a --time-steps file)
    python benchmarks/convergence.py --cached --trainable lora --lr 2e-2 --seeds 0 1 2 --lr-sweep 1 2 3 \
        --only mezo@1 fzoo-batched@3 --variants mezo fzoo-batched --tag issue14-quiet --check-full none
    python benchmarks/convergence.py --merge-runs benchmarks/results/convergence-lora-top2-cached-issue14-quiet.runs.json \
        --merged-name lora-top2-issue14 --step-times benchmarks/results/step-times-lora-top2-cached-issue14-quiet.json

Writes ``benchmarks/results/convergence-<trainable>.json``, a table on stdout and, when
matplotlib is installed, ``docs/img/convergence-<trainable>.png`` (accuracy and loss vs forward
passes). The summary says, for each variant, after how many forward passes it first reached
the accuracy plain MeZO (ZO-SGD, SPSA, one direction) reached at the full budget.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import pathlib
import platform
import sys
import textwrap
import time

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]

# name -> (ZOConfig fields, lr multiplier relative to --lr)
VARIANTS: dict[str, tuple[dict, float]] = {
    "mezo": ({}, 1.0),
    "mezo-rademacher": ({"distribution": "rademacher"}, 1.0),
    "mezo-sphere": ({"distribution": "sphere"}, 1.0),
    "forward": ({"estimator": "forward", "n_queries": 2}, 1.0),
    "forward-grad": ({"estimator": "forward-grad"}, 1.0),
    "forward-grad-lr0.3": ({"estimator": "forward-grad"}, 0.3),
    "spsa-q4": ({"n_queries": 4}, 1.0),
    "rank-q4": ({"estimator": "rank", "n_queries": 4}, 1.0),
    "momentum": ({"optimizer": "zo-sgd-momentum", "momentum": 0.9}, 0.1),
    "sign": ({"optimizer": "zo-sgd-sign"}, 0.3),
    "conservative": ({"optimizer": "zo-sgd-conservative"}, 1.0),
    "zo-adam": ({"optimizer": "zo-adam"}, 0.3),
    "sparse-random-0.5": ({"sparsity": 0.5, "sparsity_mode": "random"}, 1.0),
    # the variants measured before issue 14: the threshold re-estimated every step
    "sparse-magnitude-0.5": (
        {"sparsity": 0.5, "sparsity_mode": "magnitude", "sparsity_threshold": "per-step"},
        1.0,
    ),
    "sparse-magnitude-0.75": (
        {"sparsity": 0.75, "sparsity_mode": "magnitude", "sparsity_threshold": "per-step"},
        1.0,
    ),
    # Sparse MeZO as its paper defines it: per-tensor thresholds from the pretrained weights, kept
    "sparse-mezo": ({"sparsity": 0.75, "sparsity_mode": "magnitude", "sparsity_threshold": "initial"}, 1.0),
    # FZOO: N = 8 one-sided Rademacher probes + the unperturbed loss, normalised by their spread
    "fzoo": ({"estimator": "fzoo", "n_queries": 8, "distribution": "rademacher"}, 1.0),
    "fzoo-batched": (
        {"estimator": "fzoo", "n_queries": 8, "distribution": "rademacher", "batched_copies": True},
        1.0,
    ),
    # N = 4 one probe per forward: what the HF Trainer path runs (its closure takes no copies)
    "fzoo-q4": ({"estimator": "fzoo", "n_queries": 4, "distribution": "rademacher"}, 1.0),
    "fzoo-q4-batched": (
        {"estimator": "fzoo", "n_queries": 4, "distribution": "rademacher", "batched_copies": True},
        1.0,
    ),
    # HiZOO: diagonal Hessian preconditioner, one extra forward (and 4 bytes per trainable parameter)
    "hizoo": ({"estimator": "hizoo", "optimizer": "hizoo"}, 1.0),
    "hizoo-a0.01": ({"estimator": "hizoo", "optimizer": "hizoo", "hessian_smooth": 1e-2}, 1.0),
    "hizoo-code": ({"estimator": "hizoo", "optimizer": "hizoo", "hessian_estimate": "code"}, 1.0),
}


def forwards_per_step(cfg: dict) -> int:
    """Forward passes per step (per example of the batch: a batched FZOO pass over N + 1 copies
    counts N + 1), from the estimator registry; the conservative rule's probe adds one."""
    from zo_plugins import ZOConfig
    from zo_plugins.core.registry import get_estimator

    c = ZOConfig(**cfg)
    extra = 1 if c.optimizer == "zo-sgd-conservative" else 0
    return get_estimator(c.estimator).forwards_per_step(c) + extra


def load_example():
    spec = importlib.util.spec_from_file_location("rt_example", ROOT / "examples" / "rotten_tomatoes.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["rt_example"] = mod
    spec.loader.exec_module(mod)
    return mod


def run_variant(ex, name, args, base_state, data) -> dict:
    from zo_plugins import ZOOptimizer

    cfg, lr_mult = VARIANTS[name]
    lr_mult = args.lr_mult.get(name, lr_mult)
    tok, label_ids, train_ds, eval_ds, collate = data
    model, _ = ex.load_model_and_tokenizer(args.cache_dir)
    model = ex.select_trainable(model, args.trainable, args.lora_rank)
    model.load_state_dict(base_state)
    model.train()
    opt = ZOOptimizer(model, lr=args.lr * lr_mult, eps=args.eps, seed=args.seed, **cfg)
    objective = ex.label_word_objective(label_ids)  # the demo's loss: CE over the label words
    per_step = forwards_per_step(cfg)
    steps = args.budget // per_step
    every = max(1, args.budget // args.checkpoints)
    g = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(train_ds), generator=g).tolist()
    curve = [{"forwards": 0, **ex.evaluate(model, eval_ds, collate, label_ids, args.eval_batch_size)}]
    model.train()
    t0, used, next_eval = time.perf_counter(), 0, every
    for step in range(steps):
        idx = [order[(step * args.batch_size + i) % len(order)] for i in range(args.batch_size)]
        batch = collate([train_ds[i] for i in idx])
        opt.step(lambda: objective(model, batch))
        used += per_step
        if used >= next_eval or step == steps - 1:
            curve.append(
                {"forwards": used, **ex.evaluate(model, eval_ds, collate, label_ids, args.eval_batch_size)}
            )
            model.train()
            next_eval += every
            print(
                f"  {name:22s} forwards {used:5d}  acc {curve[-1]['accuracy']:.3f}  loss {curve[-1]['loss']:.4f}",
                flush=True,
            )
    return {
        "config": cfg,
        "lr": args.lr * lr_mult,
        "forwards_per_step": per_step,
        "steps": steps,
        "train_time_s": time.perf_counter() - t0,
        "curve": curve,
    }


# ----------------------------------------------------------------------------- final-norm, exact and fast
class FinalNormHead(torch.nn.Module):
    """What a final-norm-only run trains, applied to cached inputs: ``lm_head(norm(h))`` with
    ``h`` the final norm's input at the answer position.  With every weight but the final
    norm's frozen, ``h`` never changes, and the norm (per position) and the head read only that
    position's ``h``: the objective and the evaluation are the full model's, to float rounding,
    at a small fraction of the cost of a forward.  The ZO optimizer sees one trainable tensor
    (``norm.weight``, 576 elements), as it does on the full model."""

    def __init__(self, model):
        super().__init__()
        import copy

        self.norm = copy.deepcopy(model.model.norm)
        self.lm_head = copy.deepcopy(model.lm_head)
        self.norm.weight.requires_grad_(True)
        self.lm_head.weight.requires_grad_(False)

    def forward(self, h, rows=None):
        w = self.lm_head.weight if rows is None else self.lm_head.weight[rows]
        return torch.nn.functional.linear(self.norm(h), w)


@torch.no_grad()
def cache_answer_states(
    model, dataset, collate, batch_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, class label, label-word token) for every example: ``h`` is the final norm's input at
    the answer position (second to last, where the collator left-pads to)."""
    got = []
    hook = model.model.norm.register_forward_pre_hook(
        lambda m, a: got.append(a[0][:, -2, :].detach().clone())
    )
    ys, words = [], []
    try:
        model.eval()
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            model(**batch)
            ys.append(
                torch.tensor([dataset.items[i][1] for i in range(start, start + len(batch["input_ids"]))])
            )
            words.append(batch["labels"][:, 1])
    finally:
        hook.remove()
    return torch.cat(got), torch.cat(ys), torch.cat(words)


def label_word_metrics(logits: torch.Tensor, y: torch.Tensor, words: torch.Tensor, rows) -> dict:
    """``ex.evaluate``'s numbers from answer-position logits over the full vocabulary: accuracy of
    the argmax over the two label words, and the label word's cross-entropy over the vocabulary."""
    logits = logits.float()
    pred = logits[:, rows].argmax(-1)
    n = len(y)  # counts over n, as ex.evaluate computes them
    return {
        "accuracy": int((pred == y).sum()) / n,
        "loss": float(torch.nn.functional.cross_entropy(logits, words)),
        "predicted_positive": int(pred.sum()) / n,
        "n": n,
    }


class FinalNormTask:
    """The cached final-norm run: one trainable tensor, ``lm_head(norm(h))`` on cached states."""

    def __init__(self, base_head, cache):
        (self.h_tr, self.y_tr, _), (self.h_ev, self.y_ev, self.w_ev), label_ids = cache
        self.base_head, self.rows = base_head, torch.tensor(label_ids)
        self.n_train = len(self.h_tr)

    def fresh(self):
        import copy

        self.head = copy.deepcopy(self.base_head)
        return self.head

    def closure(self, idx):
        h, y = self.h_tr[idx], self.y_tr[idx]

        def loss(copies=None):
            """The demo's loss: cross-entropy over the two label words' logits; with ``copies``
            (FZOO's batched probes) the batch repeated that many times, one loss per copy."""
            if copies is None:
                return torch.nn.functional.cross_entropy(self.head(h, self.rows).float(), y)
            logits = self.head(h.repeat(copies, 1), self.rows).float()
            return (
                torch.nn.functional.cross_entropy(logits, y.repeat(copies), reduction="none")
                .view(copies, -1)
                .mean(1)
            )

        return loss

    @contextlib.contextmanager
    def whole_model(self):
        """The model itself is never cut on this path: nothing to switch."""
        yield

    @torch.no_grad()
    def evaluate(self):
        return label_word_metrics(self.head(self.h_ev), self.y_ev, self.w_ev, self.rows)


def run_variant_cached(name, args, task, seed, sweep: float = 1.0) -> dict:
    from zo_plugins import ZOOptimizer

    cfg, lr_mult = VARIANTS[name]
    lr_mult = args.lr_mult.get(name, lr_mult) * sweep
    module = task.fresh()
    opt = ZOOptimizer(module, lr=args.lr * lr_mult, eps=args.eps, seed=seed, **cfg)
    per_step = forwards_per_step(cfg)
    steps = args.budget // per_step
    every = max(1, args.budget // args.checkpoints)
    order = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(seed))
    curve = [{"forwards": 0, "train_s": 0.0, **task.evaluate()}]
    grads: list[float] = []
    curvs: list[float] = []
    # checkpoints every budget/checkpoints forwards, or at the forward counts of --eval-at
    marks = sorted(args.eval_at) if args.eval_at else None
    t0, used, next_eval = time.perf_counter(), 0, (marks.pop(0) if marks else every)
    train_s = 0.0  # the optimizer steps' wall-clock (batch assembly included), evaluations excluded
    for step in range(steps):
        t_step = time.perf_counter()
        idx = order[torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(order)]
        opt.step(task.closure(idx))
        train_s += time.perf_counter() - t_step
        pg = opt.last_step.projected_grads  # per direction (ZO-RankSGD's coefficients sum to 0)
        if cfg.get("estimator") == "hizoo" and pg:  # gradients, then curvatures ΔL/2ε²
            curvs.append(sum(abs(c) for c in pg[len(pg) // 2 :]) / (len(pg) // 2))
            pg = pg[: len(pg) // 2]
        grads.append(sum(abs(g) for g in pg) / len(pg) if pg else float("nan"))
        used += per_step
        if used >= next_eval or step == steps - 1:
            curve.append({"forwards": used, "train_s": train_s, **task.evaluate()})
            if marks is None:
                next_eval += every
            else:
                while marks and marks[0] <= used:
                    marks.pop(0)
                next_eval = marks.pop(0) if marks else args.budget
            if args.verbose:
                print(
                    f"    {name:22s} x{sweep:g} seed {seed} forwards {used:5d}  acc {curve[-1]['accuracy']:.3f}  "
                    f"loss {curve[-1]['loss']:.4f}",
                    flush=True,
                )
    finite = [g for g in grads if g == g]
    return {
        "config": cfg,
        "lr": args.lr * lr_mult,
        "forwards_per_step": per_step,
        "steps": steps,
        "train_time_s": time.perf_counter() - t0,
        # the scale of the scalar each direction's z is multiplied by: ZO-SGD's step per coordinate is
        # lr * |g| * |z|, sign's and Adam's are ~lr, so this relates their learning rates
        "mean_abs_projected_grad": sum(finite) / max(1, len(finite)),
        **({"mean_abs_curvature": sum(curvs) / len(curvs)} if curvs else {}),
        "curve": curve,
    }


# ----------------------------------------------------------------------------- top blocks, exact and fast
def select_top_blocks(model, trainable: str, k: int, lora_rank: int):
    """The trainable set of ``--cached --top-blocks K``: LoRA (the main job's: rank r on
    ``q_proj``/``v_proj``, alpha 2r) on the last K decoder layers only, or every weight of the
    last K decoder layers and the final norm (``full``).  Everything below layer L-K is frozen,
    so its output, the input of layer L-K, never changes during training."""
    n = model.config.num_hidden_layers
    if not 1 <= k <= n:
        raise SystemExit(f"--top-blocks {k}: the model has {n} decoder layers; choose 1..{n}.")
    for p in model.parameters():
        p.requires_grad_(False)
    if trainable == "full":
        for p in model.model.layers[n - k :].parameters():
            p.requires_grad_(True)
        model.model.norm.weight.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora_rank,
        lora_alpha=2 * lora_rank,
        lora_dropout=0.0,
        target_modules=["q_proj", "v_proj"],
        layers_to_transform=list(range(n - k, n)),
        layers_pattern="layers",
    )
    return get_peft_model(model, cfg)


def decoder(model):
    """The ``LlamaModel`` inside a causal LM, PEFT-wrapped or not."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


@torch.no_grad()
def cache_block_inputs(model, dataset, collate, batch_size: int, k: int) -> list[torch.Tensor]:
    """Per example, the hidden states entering decoder layer L-K at the example's real
    (unpadded) positions, ``[n_tokens, hidden]``."""
    inner = decoder(model)
    layer = inner.layers[model.config.num_hidden_layers - k]
    got: list[torch.Tensor] = []
    seen = []

    def hook(mod, a, kw):
        seen.append((a[0] if a else kw["hidden_states"]).detach())

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        model.eval()
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))])
            seen.clear()
            model(**batch)
            (h,) = seen
            for row, m in zip(h, batch["attention_mask"].bool()):
                got.append(row[m].clone())
    finally:
        handle.remove()
    return got


class StateDataset(torch.utils.data.Dataset):
    """Cached block inputs in place of token ids; ``items`` mirrors ``PromptDataset.items``
    (``(…, class)``) so the example's ``evaluate`` runs on it unchanged."""

    def __init__(self, states: list[torch.Tensor], ys: list[int], words: list[int]):
        self.states, self.words = states, words
        self.items = [(None, y) for y in ys]

    def __len__(self):
        return len(self.states)

    def __getitem__(self, i):
        return {"h": self.states[i], "word": self.words[i]}


def state_collate(batch):
    """The example's collator for cached states: left-pads to the longest, the same mask and
    position ids, ``inputs_embeds`` in place of ``input_ids`` (the top-K model's first layer is
    layer L-K, so its input embeddings are that layer's input)."""
    width = max(len(b["h"]) for b in batch)
    dim = batch[0]["h"].shape[-1]
    h = torch.zeros((len(batch), width, dim), dtype=batch[0]["h"].dtype)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["h"])
        h[i, width - n :] = b["h"]
        mask[i, width - n :] = 1
    labels = torch.full((len(batch), 2), -100, dtype=torch.long)
    labels[:, 1] = torch.tensor([b["word"] for b in batch])
    return {
        "inputs_embeds": h,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
        "labels": labels,
        "logits_to_keep": 2,
    }


class _Skip(torch.nn.Module):
    """Stands in for a frozen decoder layer whose output is cached: passes its input through."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class TopBlocksTask:
    """The cached LoRA / full run on the last K decoder layers: the model's own forward with its
    layer list cut to the last K (shared modules, not copies) on cached layer-(L-K) inputs.  The
    ZO optimizer sees exactly the trainable tensors the full model has."""

    def __init__(self, model, k: int, train: StateDataset, eval_ds: StateDataset, label_ids, eval_batch_size):
        self.model, self.k = model, k
        self.train, self.eval_ds, self.eval_batch_size = train, eval_ds, eval_batch_size
        self.n_train = len(train)
        inner = decoder(model)
        self.all_layers = inner.layers
        # the frozen layers below are skipped, not removed: every trainable tensor keeps its
        # qualified name (``…layers.28.…``), so ZOOptimizer derives the same directions from it
        # as on the whole model, and a cut run takes the whole model's steps
        n = len(inner.layers)
        self.top_layers = torch.nn.ModuleList([_Skip() for _ in range(n - k)] + list(inner.layers)[n - k :])
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.initial = [p.detach().clone() for p in self.trainable]
        self.label_ids = list(label_ids)
        self.top()

    def top(self):
        decoder(self.model).layers = self.top_layers
        self.model.train()

    @contextlib.contextmanager
    def whole_model(self):
        """Every layer back in place (the real model on real token ids) for the block."""
        decoder(self.model).layers = self.all_layers
        try:
            yield
        finally:
            self.top()

    def fresh(self):
        with torch.no_grad():
            for p, p0 in zip(self.trainable, self.initial):
                p.copy_(p0)
        self.model.train()
        return self.model

    def answer_states(self, batch) -> torch.Tensor:
        """The final norm's output at the answer position (the model's own layers and norm)."""
        out = decoder(self.model)(
            inputs_embeds=batch["inputs_embeds"],
            attention_mask=batch["attention_mask"],
            position_ids=batch["position_ids"],
            use_cache=False,
        )
        return out.last_hidden_state[:, -2]

    def closure(self, idx):
        batch = state_collate([self.train[int(i)] for i in idx])
        y = (batch["labels"][:, 1] == self.label_ids[1]).long()
        rows = self.model.get_output_embeddings().weight[self.label_ids]

        def loss(copies=None):
            """The demo's loss (cross-entropy over the two label words' logits), with the head's
            two label rows as one 2-D product: the full-vocabulary head through ``bmm`` would
            cost more than the two blocks.  With ``copies`` (FZOO's batched probes) the batch
            repeated that many times along dim 0, one loss per copy."""
            if copies is None:
                return torch.nn.functional.cross_entropy(
                    torch.nn.functional.linear(self.answer_states(batch), rows).float(), y
                )
            rep = {
                k: (
                    v.repeat(copies, *[1] * (v.dim() - 1))
                    if k in ("inputs_embeds", "attention_mask", "position_ids")
                    else v
                )
                for k, v in batch.items()
            }
            logits = torch.nn.functional.linear(self.answer_states(rep), rows).float()
            return (
                torch.nn.functional.cross_entropy(logits, y.repeat(copies), reduction="none")
                .view(copies, -1)
                .mean(1)
            )

        return loss

    @torch.no_grad()
    def evaluate(self):
        """``ex.evaluate``'s numbers, from one 2-D head product over the evaluation states."""
        self.model.eval()
        n, bs = len(self.eval_ds), self.eval_batch_size
        batches = [
            state_collate([self.eval_ds[i] for i in range(s, min(s + bs, n))]) for s in range(0, n, bs)
        ]
        h = torch.cat([self.answer_states(b) for b in batches])
        y = torch.tensor([item[1] for item in self.eval_ds.items])
        words = torch.cat([b["labels"][:, 1] for b in batches])
        self.model.train()
        head = self.model.get_output_embeddings().weight
        return label_word_metrics(torch.nn.functional.linear(h, head), y, words, self.label_ids)


def check_same(what: str, cached: dict, full: dict, n: int) -> None:
    """A cached evaluation must be the full model's, to float rounding."""
    if abs(cached["accuracy"] - full["accuracy"]) > 1.5 / n or abs(
        cached["loss"] - full["loss"]
    ) > 1e-3 * max(1.0, full["loss"]):
        raise SystemExit(
            f"{what}: cached evaluation {cached['accuracy']:.4f}/{cached['loss']:.5f} != full model "
            f"{full['accuracy']:.4f}/{full['loss']:.5f}"
        )
    print(
        f"{what}: cached evaluation equals the full model's: accuracy {cached['accuracy']:.4f} "
        f"({full['accuracy']:.4f}), loss {cached['loss']:.5f} ({full['loss']:.5f})",
        flush=True,
    )


def mean_curves(per_seed: list[dict]) -> dict:
    """Average each variant's curve over seeds (same checkpoints in every seed)."""
    out = {}
    for name in per_seed[0]:
        runs = [r[name] for r in per_seed]
        curve = []
        for points in zip(*(r["curve"] for r in runs)):
            c = {"forwards": points[0]["forwards"]}
            for k in ("accuracy", "loss", "predicted_positive", "train_s"):
                if all(k in p for p in points):
                    c[k] = sum(p[k] for p in points) / len(points)
            c["accuracy_min"] = min(p["accuracy"] for p in points)
            c["accuracy_max"] = max(p["accuracy"] for p in points)
            c["n"] = points[0]["n"]
            curve.append(c)
        out[name] = {
            **{k: v for k, v in runs[0].items() if k != "curve"},
            "seeds": len(runs),
            "train_time_s": sum(r["train_time_s"] for r in runs),
            "curve": curve,
        }
    return out


def first_hit(curve: list[dict], target: float) -> int | None:
    return next((c["forwards"] for c in curve if c["forwards"] > 0 and c["accuracy"] >= target), None)


def summarize(results: dict, n_eval: int, sweep: dict | None = None) -> dict:
    if "mezo" not in results:
        return {}
    start = results["mezo"]["curve"][0]["accuracy"]
    target = results["mezo"]["curve"][-1]["accuracy"]
    budget = results["mezo"]["curve"][-1]["forwards"]
    # binomial standard error of one accuracy on n_eval examples: MeZO's gain over the zero-shot
    # start means something only when it is well above the evaluation noise
    se = (max(start * (1 - start), 1e-12) / n_eval) ** 0.5
    out = {
        "start_accuracy": start,
        "mezo_final_accuracy": target,
        "mezo_budget_forwards": budget,
        "accuracy_standard_error": se,
        "mezo_gain_in_standard_errors": (target - start) / se,
        "variants": {},
    }
    # MeZO itself may reach its final accuracy well before its budget (a plateau): then "a third
    # of MeZO's budget" overstates a speed-up; compare with MeZO's own first hit as well
    first = {
        name: next((c["forwards"] for c in r["curve"] if c["forwards"] > 0 and c["accuracy"] >= target), None)
        for name, r in results.items()
    }
    out["mezo_forwards_to_own_final_accuracy"] = first["mezo"]
    # with a learning-rate sweep, a variant's (and MeZO's) fastest route to the target over every
    # learning rate it ran: MeZO at a larger learning rate may itself get there much sooner than
    # at the learning rate with the best final accuracy, and a variant's "speed-up" should be
    # measured against that
    fastest: dict[str, tuple[int | None, str | None]] = {}
    for name in results:
        runs = {k: r for k, r in (sweep or {}).items() if k.rsplit("@", 1)[0] == name}
        hits = [(h, k) for k, r in runs.items() if (h := first_hit(r["curve"], target)) is not None]
        fastest[name] = min(hits) if hits else (None, None)
    if sweep:
        out["mezo_fastest_over_lr_sweep"] = {"forwards": fastest["mezo"][0], "run": fastest["mezo"][1]}
    for name, r in results.items():
        hit = first[name]
        out["variants"][name] = {
            "final_accuracy": r["curve"][-1]["accuracy"],
            "forwards_to_mezo_accuracy": hit,
            "fraction_of_mezo_budget": None if hit is None else hit / budget,
            "speedup_vs_mezo_first_hit": None
            if hit is None or first["mezo"] is None
            else first["mezo"] / hit,
        }
        if sweep:
            f, mf = fastest[name][0], fastest["mezo"][0]
            out["variants"][name].update(
                {
                    "fastest_over_lr_sweep": f,
                    "fastest_run": fastest[name][1],
                    "speedup_vs_fastest_mezo": None if f is None or mf is None else mf / f,
                }
            )
    return out


def markdown_table(report: dict) -> str:
    """The docs' table: accuracy at each checkpoint, and the forwards each variant needed to
    reach MeZO's final accuracy."""
    results, summary = report["results"], report.get("summary") or {}
    xs = [c["forwards"] for c in next(iter(results.values()))["curve"]]
    swept = "mezo_fastest_over_lr_sweep" in summary
    head = (
        "| variant | fwd/step | lr | accuracy at "
        + " / ".join(map(str, xs))
        + " forwards | reaches MeZO's final accuracy at |"
    )
    lines = [
        head + (" fastest over its lr sweep |" if swept else ""),
        "|---|---|---|---|---|" + ("---|" if swept else ""),
    ]
    for name, r in results.items():
        if [c["forwards"] for c in r["curve"]] == xs:
            accs = " / ".join(f"{c['accuracy']:.3f}" for c in r["curve"])
        else:  # other checkpoints (a run with another budget): say where each was taken
            accs = " / ".join(f"{c['accuracy']:.3f} @{c['forwards']}" for c in r["curve"])
        v = summary.get("variants", {}).get(name, {})
        hit = v.get("forwards_to_mezo_accuracy")
        frac = v.get("fraction_of_mezo_budget")
        speed = v.get("speedup_vs_mezo_first_hit")
        reach = (
            "not reached"
            if hit is None
            else (
                f"{hit} ({frac:.2f} of MeZO's budget"
                + ("" if speed is None else f"; {speed:.2f}x MeZO's own first hit")
                + ")"
            )
        )
        row = f"| {name} | {r['forwards_per_step']} | {r['lr']:.3g} | {accs} | {reach} |"
        if swept:
            f, run, sp = (
                v.get("fastest_over_lr_sweep"),
                v.get("fastest_run"),
                v.get("speedup_vs_fastest_mezo"),
            )
            row += (
                " not reached |"
                if f is None
                else (f" {f} ({run}" + ("" if sp is None else f"; {sp:.2f}x the fastest MeZO") + ") |")
            )
        lines.append(row)
    if summary:
        lines.append("")
        lines.append(
            f"Zero-shot {summary['start_accuracy']:.3f}; MeZO {summary['mezo_final_accuracy']:.3f} after "
            f"{summary['mezo_budget_forwards']} forwards (first reached after "
            f"{summary['mezo_forwards_to_own_final_accuracy']}), a gain of "
            f"{summary['mezo_gain_in_standard_errors']:.1f} standard errors ({summary['accuracy_standard_error']:.3f} each)."
            + (
                ""
                if not swept
                else f" Over its learning-rate sweep MeZO reaches that accuracy fastest after "
                f"{summary['mezo_fastest_over_lr_sweep']['forwards']} forwards ({summary['mezo_fastest_over_lr_sweep']['run']})."
            )
        )
    return "\n".join(lines)


def goal_summary(sweep: dict, n_eval: int, step_cost: dict | None = None, strict: bool = False) -> dict:
    """Issue 14's question over a learning-rate sweep.  The target is MeZO's best accuracy: its
    highest seed-mean final accuracy over its learning rates.  For every method, over its
    learning rates: the forward passes and the training seconds (optimizer steps only,
    evaluations excluded; seed means) at which its seed-mean accuracy first reaches the target,
    at its fastest learning rate (fewest passes), against MeZO at its fastest; and the final
    accuracy of that run.  The goal: <= 1/3 of MeZO's passes, <= 1/2 of its seconds, and a final
    accuracy no more than one standard error below the target.

    "Fastest" counts, for every method and MeZO alike, only the learning rates whose run *holds*
    the accuracy (final accuracy >= target - 1 SE): one that touches the target and then
    collapses is not a setting anyone would train with.  Where no learning rate of a method
    holds, its fastest of all is reported (and its goal is not met).  ``fastest_any`` keeps the
    unconditional fastest of each method (``strict=True`` compares on it instead)."""
    by_method: dict[str, dict] = {}
    for key, r in sweep.items():
        by_method.setdefault(key.rsplit("@", 1)[0], {})[key] = r
    if "mezo" not in by_method:
        return {}
    final = lambda r: r["curve"][-1]["accuracy"]  # noqa: E731
    mezo = by_method["mezo"]
    target_run = max(mezo, key=lambda k: final(mezo[k]))
    target = final(mezo[target_run])
    se = (max(target * (1 - target), 1e-12) / n_eval) ** 0.5

    def hit(r):
        for c in r["curve"]:
            if c["forwards"] > 0 and c["accuracy"] >= target - 1e-9:
                return c["forwards"], c.get("train_s")
        return None

    out = {"target": target, "target_run": target_run, "standard_error": se, "strict": strict, "methods": {}}
    for name, runs in by_method.items():
        best = max(runs, key=lambda k: final(runs[k]))
        e = {
            "forwards_per_step": next(iter(runs.values()))["forwards_per_step"],
            "best_final_accuracy": final(runs[best]),
            "best_final_run": best,
        }
        hits = [
            (h[0], h[1] if h[1] is not None else float("inf"), k) for k, r in runs.items() if (h := hit(r))
        ]
        last = runs[best]["curve"][-1]
        e.update(
            best_final_spread=[
                last.get("accuracy_min", last["accuracy"]),
                last.get("accuracy_max", last["accuracy"]),
            ],
            best_final_seeds=runs[best].get("seeds", 1),
        )
        if hits:
            holding = [h for h in hits if final(runs[h[2]]) >= target - se]
            any_f, any_sec, any_k = min(hits)
            e["fastest_any"] = {"run": any_k, "forwards": any_f, "seconds": any_sec}
            f, sec, k = min(hits) if strict or not holding else min(holding)
            e["holds"] = final(runs[k]) >= target - se
            last = runs[k]["curve"][-1]
            e.update(
                forwards=f,
                seconds=sec,
                run=k,
                lr=runs[k]["lr"],
                final_accuracy=final(runs[k]),
                final_spread=[
                    last.get("accuracy_min", last["accuracy"]),
                    last.get("accuracy_max", last["accuracy"]),
                ],
                seeds=runs[k].get("seeds", 1),
            )
        out["methods"][name] = e
    m = out["methods"]["mezo"]
    for e in out["methods"].values():
        if "forwards" in e and "forwards" in m:
            e["forwards_ratio"] = e["forwards"] / m["forwards"]
            e["seconds_ratio"] = e["seconds"] / m["seconds"] if m["seconds"] else None
            e["goal_met"] = bool(
                e["forwards_ratio"] <= 1 / 3 + 1e-9
                and e["seconds_ratio"] is not None
                and e["seconds_ratio"] <= 0.5
                and e["final_accuracy"] >= target - se
            )
    # runs made minutes apart on a shared machine see different loads: the passes to the target
    # times each method's median seconds per pass from one interleaved timing (--time-steps)
    # compare the methods at one load
    for name, e in out["methods"].items():
        if step_cost and name in step_cost and "mezo" in step_cost and "forwards" in e and "forwards" in m:
            e["seconds_at_step_cost"] = e["forwards"] * step_cost[name]["median_s_per_forward"]
            e["seconds_at_step_cost_ratio"] = e["seconds_at_step_cost"] / (
                m["forwards"] * step_cost["mezo"]["median_s_per_forward"]
            )
    return out


def goal_table(goal: dict) -> str:
    """The docs' table of ``goal_summary``."""
    if not goal:
        return ""
    timed = any("seconds_at_step_cost_ratio" in e for e in goal["methods"].values())
    lines = [
        "| method | fwd/step | fastest lr | seeds | passes to target | x MeZO's | seconds to target | x MeZO's | "
        + ("x MeZO's at one load (interleaved step cost) | " if timed else "")
        + "final accuracy (that lr; seed min-max) | best final accuracy (its sweep) | goal met |",
        "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if timed else ""),
    ]

    def acc(v, spread, n):
        return f"{v:.3f}" + ("" if n <= 1 or not spread else f" ({spread[0]:.3f}-{spread[1]:.3f})")

    for name, e in goal["methods"].items():
        best = (
            f"{acc(e['best_final_accuracy'], e.get('best_final_spread'), e.get('best_final_seeds', 1))} "
            f"({e['best_final_run']})"
        )
        if "forwards" in e:
            ratio_s = "-" if e.get("seconds_ratio") is None else f"{e['seconds_ratio']:.2f}"
            at_cost = (
                ""
                if not timed
                else (
                    " - |"
                    if "seconds_at_step_cost_ratio" not in e
                    else f" {e['seconds_at_step_cost_ratio']:.2f} |"
                )
            )
            lines.append(
                f"| {name} | {e['forwards_per_step']} | {e['run'].rsplit('@', 1)[-1]}x ({e['lr']:.3g}) | "
                f"{e.get('seeds', 1)} | {e['forwards']} | {e['forwards_ratio']:.2f} | {e['seconds']:.3g} | "
                f"{ratio_s} |{at_cost} {acc(e['final_accuracy'], e.get('final_spread'), e.get('seeds', 1))} | "
                f"{best} | {'**yes**' if e['goal_met'] else 'no'} |"
            )
        else:
            lines.append(
                f"| {name} | {e['forwards_per_step']} | - | {e.get('best_final_seeds', 1)} | not reached | "
                f"- | - | - |{' - |' if timed else ''} - | {best} | no |"
            )
    lines.append("")
    lines.append(
        f"Target: MeZO's best accuracy {goal['target']:.3f} ({goal['target_run']}, seed mean; one "
        f"standard error {goal['standard_error']:.3f}). Goal: <= 1/3 of MeZO's passes and <= 1/2 of its "
        "seconds to the target, each at its fastest learning rate, with a final accuracy at most one "
        "standard error below the target. "
        + (
            "Fastest: of all learning rates, whether the run holds the accuracy or not."
            if goal.get("strict")
            else "Fastest: of the learning rates whose run holds the accuracy (final accuracy at most one "
            "standard error below the target), for MeZO too; a method none of whose runs holds is "
            "shown at its fastest of all."
        )
    )
    return "\n".join(lines)


def machine() -> str:
    """The machine a run measured on, for its JSON and its figures' captions."""
    return f"{os.cpu_count()}-core {platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads"


def caption(report: dict) -> str:
    """What a figure says under its title: the command, the machine and the date of its JSON."""
    command = report.get("command")
    if not command:  # a JSON written before commands were recorded: its settings
        keys = ("trainable", "top_blocks", "budget", "lr", "eps", "seeds", "lr_sweep")
        flags = " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k in keys
            if (v := report.get(k)) is not None
        )
        command = f"python benchmarks/convergence.py{' --cached' if report.get('cached') else ''} {flags}"
    text = f"{command} -- {report.get('machine', 'machine not recorded')}, {report.get('date', '?')}"
    return "\n".join(textwrap.wrap(text, 170))


def _finish(fig, path: pathlib.Path, note: str) -> None:
    if note:  # under the axes, as the source line of a figure
        fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=7, color="0.3")
        fig.tight_layout(rect=(0, 0.035 * (note.count("\n") + 1), 1, 1))
    else:
        fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def plot_goal(
    sweep: dict,
    goal: dict,
    path: pathlib.Path,
    title: str = "",
    step_cost: dict | None = None,
    note: str = "",
) -> bool:
    """Accuracy against forward passes and against training seconds, each method at the learning
    rate of ``goal_table`` (its fastest to the target, else its best final accuracy)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    at_cost = bool(step_cost) and all(name in step_cost for name in goal["methods"])
    for i, (name, e) in enumerate(goal["methods"].items()):
        r = sweep[e.get("run", e["best_final_run"])]
        style = dict(
            marker="o",
            markersize=3,
            linestyle="-" if i < 10 else "--",
            label=f"{name} ({e.get('run', e['best_final_run']).rsplit('@', 1)[-1]}x)",
        )
        accs = [c["accuracy"] for c in r["curve"]]
        axes[0].plot([c["forwards"] for c in r["curve"]], accs, **style)
        if at_cost:  # one load for every method: passes x its interleaved seconds per pass
            xs = [c["forwards"] * step_cost[name]["median_s_per_forward"] for c in r["curve"]]
        else:
            xs = [c.get("train_s", float("nan")) for c in r["curve"]]
        axes[1].plot(xs, accs, **style)
    for ax in axes:
        ax.axhline(goal["target"], color="grey", linewidth=0.8, linestyle=":")
    axes[0].set(xlabel="forward passes", ylabel="held-out accuracy (seed mean)", title=title)
    axes[1].set(
        xlabel="seconds at one load (passes x interleaved s/pass)"
        if at_cost
        else "training seconds (evaluations excluded)",
        ylabel="held-out accuracy (seed mean)",
    )
    axes[0].legend(fontsize=7)
    _finish(fig, path, note)
    return True


def plot(results: dict, path: pathlib.Path, note: str = "") -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (name, r) in enumerate(results.items()):
        xs = [c["forwards"] for c in r["curve"]]
        style = dict(marker="o", markersize=3, linestyle="-" if i < 10 else "--", label=name)
        axes[0].plot(xs, [c["accuracy"] for c in r["curve"]], **style)
        axes[1].plot(xs, [c["loss"] for c in r["curve"]], **style)
    axes[0].set(xlabel="forward passes", ylabel="held-out accuracy")
    axes[1].set(xlabel="forward passes", ylabel="held-out LM loss of the label word (full vocabulary)")
    axes[0].legend(fontsize=7)
    _finish(fig, path, note)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    pre_ap = argparse.ArgumentParser(add_help=False)  # --define first: it adds --variants choices
    pre_ap.add_argument("--define", nargs="+", default=[])
    pre, _ = pre_ap.parse_known_args()
    ap.add_argument(
        "--define",
        nargs="+",
        default=[],
        metavar="NAME=JSON",
        help='add variants: NAME={"ZOConfig field": value, ...} (lr multiplier 1), e.g. '
        '\'hizoo-a0.01={"estimator": "hizoo", "optimizer": "hizoo", "hessian_smooth": 0.01}\'',
    )
    for item in pre.define:
        name, _, cfg = item.partition("=")
        VARIANTS[name] = (json.loads(cfg), 1.0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--trainable", default="final-norm", choices=["lora", "full", "norms", "final-norm"])
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument("--budget", type=int, default=600, help="forward passes per variant")
    ap.add_argument("--checkpoints", type=int, default=6)
    ap.add_argument(
        "--eval-at",
        type=int,
        nargs="+",
        default=None,
        metavar="FORWARDS",
        help="--cached: evaluate when the forward count first reaches each of these (instead of "
        "every budget/checkpoints); the budget's end is always evaluated",
    )
    ap.add_argument("--lr", type=float, default=None, help="default: 1e-4 (lora), 1e-6 (full), 3e-3 (norms)")
    ap.add_argument("--eps", type=float, default=None, help="default: 1e-2 (lora/norms), 1e-3 (full)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument("--n-eval", type=int, default=300)
    ap.add_argument("--eval-batch-size", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--cached",
        action="store_true",
        help="final-norm: train lm_head(norm(h)) on cached answer-position states (exact, "
        "~300x faster); lora/full: train the last --top-blocks layers on their cached "
        "inputs (exact for that trainable set); allows --seeds, --lr-sweep and big budgets",
    )
    ap.add_argument(
        "--top-blocks",
        type=int,
        default=2,
        help="--cached lora/full: LoRA on / every weight of the last K decoder layers (+ final "
        "norm for full)",
    )
    ap.add_argument(
        "--lr-mult",
        nargs="+",
        default=[],
        metavar="VARIANT=M",
        help="override a variant's lr multiplier (relative to --lr), e.g. sign=0.01",
    )
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--verbose", action="store_true", help="print every checkpoint of every run")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="--cached: average over these seeds")
    ap.add_argument(
        "--train-pool", type=int, default=2048, help="--cached: training examples cached and cycled"
    )
    ap.add_argument(
        "--lr-sweep",
        type=float,
        nargs="+",
        default=None,
        help="--cached: run each variant at these multiples of its lr and report its best",
    )
    ap.add_argument(
        "--only",
        nargs="+",
        default=None,
        metavar="VARIANT@MULT",
        help="--cached --lr-sweep: run only these cells of the variants x sweep grid (each method "
        "at the few learning rates that bracket its best); the means cover what ran",
    )
    ap.add_argument(
        "--check-full",
        choices=["both", "before", "none"],
        default="both",
        help="--cached lora/full: check the cached evaluation against the real 30-layer model "
        "before training and after the first run (both), before training only, or not at "
        "all (a follow-up run on a cache already checked; each check is a full-model "
        "evaluation: minutes on a loaded 2-core machine)",
    )
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--time-steps",
        type=int,
        default=0,
        metavar="K",
        help="--cached: instead of training, time K optimizer steps of every variant, "
        "interleaved round-robin in this process (the machine's load drifts), and write "
        "the median step time per variant",
    )
    ap.add_argument("--cache-dir", type=pathlib.Path, default=None)
    ap.add_argument("--output", type=pathlib.Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--plot-dir", type=pathlib.Path, default=ROOT / "docs" / "img")
    ap.add_argument(
        "--merge-runs",
        nargs="+",
        default=None,
        metavar="RUNS_JSON[:SEEDS]",
        help="merge the per-seed runs of these .runs.json files (same base lr/eps; e.g. a seed-0 "
        "sweep and a seeds-1-2 run of the contenders), average each run key over the seeds "
        "it has, write convergence-<--merged-name>.json, the goal table and plot, exit",
    )
    ap.add_argument("--merged-name", default="merged", help="--merge-runs: name of the merged report")
    ap.add_argument(
        "--drop",
        nargs="+",
        default=[],
        metavar="FILE:VARIANT@MULT:SEED",
        help="--merge-runs: leave these cells out (FILE: the .runs.json file name), e.g. runs timed "
        "while other jobs loaded the machine and re-run in a quiet sitting",
    )
    ap.add_argument(
        "--step-times",
        type=pathlib.Path,
        default=None,
        metavar="STEP_TIMES_JSON",
        help="--merge-runs: also give the seconds ratio at one load: passes to the target times "
        "each method's median seconds per pass from this --time-steps file",
    )
    ap.add_argument(
        "--report",
        type=pathlib.Path,
        nargs="+",
        default=None,
        help="print the markdown table of results JSONs (same task and settings; later "
        "files add variants, e.g. runs made in two sittings), redraw the plot, exit",
    )
    args = ap.parse_args()
    if args.merge_runs is not None:
        sweep, settings = merge_runs(args.merge_runs, args.drop)
        n_eval = next(iter(sweep.values()))["curve"][-1]["n"]
        step_cost = json.loads(args.step_times.read_text())["variants"] if args.step_times else None
        goal = goal_summary(sweep, n_eval, step_cost)
        goal_any = goal_summary(sweep, n_eval, step_cost, strict=True)
        args.output.mkdir(parents=True, exist_ok=True)
        out = args.output / f"convergence-{args.merged_name}.json"
        out.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%d"),
                    "machine": machine(),
                    "command": "python benchmarks/convergence.py " + " ".join(sys.argv[1:]),
                    "merged_from": args.merge_runs,
                    **settings,
                    "n_eval": n_eval,
                    "goal": goal,
                    "goal_fastest_of_all": goal_any,
                    "sweep_results": sweep,
                },
                indent=2,
            )
        )
        print(goal_table(goal))
        print("\nThe same, each method at its fastest learning rate whether it holds or not:\n")
        print(goal_table(goal_any))
        png = args.plot_dir / f"convergence-{args.merged_name}-goal.png"
        files = ", ".join(
            pathlib.Path(f.split(":")[0]).name.removesuffix(".runs.json") for f in args.merge_runs
        )
        note = caption(
            {
                "command": f"benchmarks/convergence.py, seed means over the sittings {files} "
                "(their commands: docs/benchmarks.md)",
                "machine": machine(),
                "date": time.strftime("%Y-%m-%d"),
            }
        )
        if goal and plot_goal(sweep, goal, png, args.merged_name, step_cost, note):
            print(f"plot: {png}")
        print(f"wrote {out}")
        return
    if args.report is not None:
        report = json.loads(args.report[0].read_text())
        for extra in args.report[1:]:
            more = json.loads(extra.read_text())
            keys = (
                "trainable",
                "top_blocks",
                "lr",
                "eps",
                "batch_size",
                "n_eval",
                "seeds",
            )  # budgets may differ
            if any(more.get(k) != report.get(k) for k in keys):
                raise SystemExit(f"{extra} was run with other settings than {args.report[0]}; not merged.")
            report["results"].update(more["results"])
        sweeps = [report.get("sweep_results") or {}]
        for extra in args.report[1:]:
            sweeps.append(json.loads(extra.read_text()).get("sweep_results") or {})
        merged_sweep = {k: v for sw in sweeps for k, v in sw.items()} or None
        if merged_sweep:
            report["sweep_results"] = merged_sweep
        report["summary"] = summarize(report["results"], report["n_eval"], merged_sweep)
        print(markdown_table(report))
        png = args.plot_dir / (args.report[0].stem + ".png")
        if plot(report["results"], png, caption(report)):
            print(f"plot: {png}")
        if merged_sweep:
            report["goal"] = goal_summary(merged_sweep, report["n_eval"])
            print("\n" + goal_table(report["goal"]))
            png = args.plot_dir / (args.report[0].stem + "-goal.png")
            if report["goal"] and plot_goal(
                merged_sweep, report["goal"], png, report.get("trainable", ""), note=caption(report)
            ):
                print(f"plot: {png}")
        if len(args.report) > 1:
            report["merged_from"] = [str(r) for r in args.report]
        args.report[0].write_text(json.dumps(report, indent=2))  # with the summary recomputed
        print(f"wrote {args.report[0]}")
        return
    mults = {}
    for item in args.lr_mult:
        name, _, value = item.partition("=")
        if name not in VARIANTS or not value:
            raise SystemExit(
                f"--lr-mult {item!r}: expected VARIANT=MULTIPLIER with VARIANT one of {list(VARIANTS)}."
            )
        mults[name] = float(value)
    args.lr_mult = mults
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = {"lora": (1e-4, 1e-2), "full": (1e-6, 1e-3), "norms": (3e-4, 1e-2), "final-norm": (1e-2, 1e-2)}
    args.lr = args.lr if args.lr is not None else defaults[args.trainable][0]
    args.eps = args.eps if args.eps is not None else defaults[args.trainable][1]

    ex = load_example()
    args.cache_dir = args.cache_dir or ex.DEFAULT_CACHE
    torch.manual_seed(args.seed)
    model, tok = ex.load_model_and_tokenizer(args.cache_dir)
    label_ids = ex.label_token_ids(tok)
    splits = ex.load_splits(args.n_eval, None, args.seed)
    data = (
        tok,
        label_ids,
        ex.PromptDataset(splits.train, tok, label_ids, args.max_length),
        ex.PromptDataset(splits.eval, tok, label_ids, args.max_length),
        ex.make_collator(tok.pad_token_id),
    )
    torch.manual_seed(args.seed)  # the same adapter initialisation for every variant
    if args.cached and args.trainable in ("lora", "full"):
        model = select_top_blocks(model, args.trainable, args.top_blocks, args.lora_rank)
    else:
        model = ex.select_trainable(model, args.trainable, args.lora_rank)
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    args.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    results = {}
    if args.cached:
        if args.trainable not in ("final-norm", "lora", "full"):
            raise SystemExit(
                f"--cached is exact for --trainable final-norm, lora or full (on the last "
                f"--top-blocks layers), not {args.trainable!r}."
            )
        t0 = time.perf_counter()
        key = f"pool{args.train_pool}-eval{args.n_eval}-len{args.max_length}-seed{args.seed}"
        pool = ex.PromptDataset(splits.train[: args.train_pool], tok, label_ids, args.max_length)
        if args.trainable == "final-norm":
            cache_file = args.cache_dir / f"convergence-states-{key}.pt"
            if cache_file.exists():
                states = torch.load(cache_file, weights_only=True)
            else:
                states = [
                    cache_answer_states(model, pool, data[4], args.eval_batch_size),
                    cache_answer_states(model, data[3], data[4], args.eval_batch_size),
                ]
                torch.save(states, cache_file)
            cache = (*states, label_ids)
            n_cached = (len(states[0][0]), len(states[1][0]))
            task = FinalNormTask(FinalNormHead(model), cache)
        else:
            cache_file = args.cache_dir / f"convergence-block-inputs-top{args.top_blocks}-{key}.pt"
            if cache_file.exists():
                states = torch.load(cache_file, weights_only=True)
            else:
                states = [
                    cache_block_inputs(model, pool, data[4], args.eval_batch_size, args.top_blocks),
                    cache_block_inputs(model, data[3], data[4], args.eval_batch_size, args.top_blocks),
                ]
                torch.save(states, cache_file)
            sets = [
                StateDataset(st, [y for _, y in ds.items], [ids[-1] for ids, _ in ds.items])
                for st, ds in zip(states, (pool, data[3]))
            ]
            n_cached = (len(sets[0]), len(sets[1]))
            task = TopBlocksTask(model, args.top_blocks, sets[0], sets[1], label_ids, args.eval_batch_size)
        print(
            f"cached {n_cached[0]} training and {n_cached[1]} evaluation states in "
            f"{time.perf_counter() - t0:.0f} s ({cache_file}); {args.trainable_params} trainable parameters",
            flush=True,
        )

        def full_model_eval():
            """The real model (every layer, real token ids) on the evaluation split."""
            with task.whole_model():
                return ex.evaluate(model, data[3], data[4], label_ids, args.eval_batch_size)

        # the cached path must evaluate exactly what the full model evaluates: before training,
        # and (for the top-blocks path, whose weights are the model's own) after the first run
        task.fresh()
        if args.check_full != "none":
            check_same("before training", task.evaluate(), full_model_eval(), n_cached[1])
        if (
            isinstance(task, TopBlocksTask) and args.check_full != "none"
        ):  # the demo's objective on the real model
            idx = torch.arange(args.batch_size)
            with torch.no_grad():
                cached_loss = float(task.closure(idx)())
                with task.whole_model():
                    real_loss = float(
                        ex.label_word_objective(label_ids)(model, data[4]([pool[int(i)] for i in idx]))
                    )
            if abs(cached_loss - real_loss) > 1e-4 * max(1.0, abs(real_loss)):
                raise SystemExit(
                    f"cached training loss {cached_loss:.6f} != the real model's {real_loss:.6f}"
                )
            print(
                f"cached training loss equals the real model's: {cached_loss:.6f} ({real_loss:.6f})",
                flush=True,
            )
        if args.time_steps:
            write_step_times(args, time_steps(args, task, args.variants, args.time_steps))
            return
        per_seed, checked_trained = [], False
        sweep = args.lr_sweep or [1.0]
        for seed in args.seeds or [args.seed]:
            per_seed.append({})
            for name in args.variants:
                for m in sweep:
                    key = name if len(sweep) == 1 else f"{name}@{m:g}"
                    if args.only and key not in args.only:
                        continue
                    r = per_seed[-1][key] = run_variant_cached(name, args, task, seed, m)
                    print(
                        f"  seed {seed} {key:26s} acc {r['curve'][0]['accuracy']:.3f} -> "
                        f"{r['curve'][-1]['accuracy']:.3f}  ({r['train_time_s']:.0f} s)",
                        flush=True,
                    )
                    if isinstance(task, TopBlocksTask) and not checked_trained and args.check_full == "both":
                        check_same(
                            f"after {key}, seed {seed}", r["curve"][-1], full_model_eval(), n_cached[1]
                        )
                        checked_trained = True
                    write_runs(args, per_seed)
        results = mean_curves(per_seed)
        if len(sweep) > 1 and args.only:  # a partial grid: the merged report (--merge-runs) reads it
            args.sweep_results = results
            results = {}
        elif len(sweep) > 1:
            # each variant at its best learning rate of the sweep (highest mean final accuracy;
            # chosen on the evaluation split for every variant alike, MeZO included)
            args.sweep_results = results
            best = {}
            for name in args.variants:
                key = max((f"{name}@{m:g}" for m in sweep), key=lambda k: results[k]["curve"][-1]["accuracy"])
                best[name] = {**results[key], "lr_sweep_choice": key}
            results = best
    else:
        del model
        for name in args.variants:
            print(f"{name}: {VARIANTS[name][0]}", flush=True)
            results[name] = run_variant(ex, name, args, base_state, data)
            write_report(args, results, len(data[3]), final=False)
    write_report(args, results, len(data[3]), final=True)


def time_steps(args, task, names: list[str], k: int) -> dict:
    """Median wall-clock of one optimizer step per variant, the variants interleaved round-robin
    (one warm-up round, then ``k``), each on its own fresh optimizer over the same weights."""
    from zo_plugins import ZOOptimizer

    task.fresh()
    module = task.head if isinstance(task, FinalNormTask) else task.model
    opts = {}
    for name in names:
        cfg, mult = VARIANTS[name]
        opts[name] = ZOOptimizer(module, lr=0.0, eps=args.eps, seed=args.seed, **cfg)  # lr 0: weights stay
    times: dict[str, list[float]] = {n: [] for n in names}
    order = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(args.seed))
    for step in range(k + 1):
        idx = order[torch.arange(step * args.batch_size, (step + 1) * args.batch_size) % len(order)]
        for name in names:
            t = time.perf_counter()
            opts[name].step(task.closure(idx))
            if step:
                times[name].append(time.perf_counter() - t)
    out = {}
    for name in names:
        ts = sorted(times[name])
        per = forwards_per_step(VARIANTS[name][0])
        out[name] = {
            "median_step_s": ts[len(ts) // 2],
            "forwards_per_step": per,
            "median_s_per_forward": ts[len(ts) // 2] / per,
            "step_s": times[name],
        }
        print(
            f"  {name:22s} {out[name]['median_step_s']:.3f} s/step  {out[name]['median_s_per_forward']:.4f} s/forward",
            flush=True,
        )
    return out


def write_step_times(args, times: dict) -> None:
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"step-times-{report_tag(args)}.json"
    out.write_text(
        json.dumps(
            {
                "date": time.strftime("%Y-%m-%d"),
                "machine": machine(),
                "command": "python benchmarks/convergence.py " + " ".join(sys.argv[1:]),
                "trainable": args.trainable,
                "top_blocks": top_blocks(args),
                "batch_size": args.batch_size,
                "threads": torch.get_num_threads(),
                "rounds": args.time_steps,
                "variants": times,
            },
            indent=1,
        )
    )
    print(f"wrote {out}")


def top_blocks(args) -> int | None:
    return args.top_blocks if args.cached and args.trainable in ("lora", "full") else None


def report_tag(args) -> str:
    k = top_blocks(args)
    tag = args.trainable + ("" if k is None else f"-top{k}") + ("-cached" if args.cached else "")
    return tag + (f"-{args.tag}" if args.tag else "")


def write_runs(args, per_seed: list[dict]) -> None:
    """Every finished run so far, per seed and learning rate (the report holds means over seeds;
    a long sweep that is stopped keeps what it did)."""
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"convergence-{report_tag(args)}.runs.json"
    seeds = (args.seeds or [args.seed])[: len(per_seed)]
    out.write_text(json.dumps({"lr": args.lr, "eps": args.eps, "seeds": seeds, "runs": per_seed}, indent=1))


def merge_runs(files: list[str], drop: list[str] | tuple = ()) -> tuple[dict, dict]:
    """The per-seed runs of several ``.runs.json`` files (e.g. a seed-0 sweep and a later
    seeds-1-2 run of the contenders) as one sweep: for every run key (``variant@multiplier``),
    the mean curve over every seed any file holds for it.  ``FILE:0,1,2`` names the seeds of a
    file written before the seeds were recorded (default: its ``seeds``, else 0, 1, ...).  A
    seed run twice for one key, or files with another base lr / eps, are refused; ``drop`` names
    cells to leave out (``FILE:KEY:SEED``, e.g. a run timed under other jobs' load and re-run in
    another file).  Returns the merged sweep (each run with ``seeds``: how many, and
    ``seed_list``) and the settings."""
    dropped = {tuple(d.rsplit(":", 2)) for d in drop}
    by_key: dict[str, dict[int, dict]] = {}
    settings = None
    for item in files:
        path, _, seeds = item.partition(":")
        data = json.loads(pathlib.Path(path).read_text())
        mine = {"lr": data["lr"], "eps": data["eps"]}
        if settings is not None and mine != settings:
            raise SystemExit(f"{path}: lr/eps {mine} differ from {settings}; not merged.")
        settings = mine
        seed_list = (
            [int(x) for x in seeds.split(",")]
            if seeds
            else data.get("seeds") or list(range(len(data["runs"])))
        )
        if len(seed_list) != len(data["runs"]):
            raise SystemExit(f"{path}: {len(data['runs'])} seeds of runs, {len(seed_list)} seeds named.")
        for seed, runs in zip(seed_list, data["runs"]):
            for key, r in runs.items():
                if (pathlib.Path(path).name, key, str(seed)) in dropped:
                    dropped.discard((pathlib.Path(path).name, key, str(seed)))
                    continue
                if seed in by_key.setdefault(key, {}):
                    raise SystemExit(f"{key} seed {seed} appears twice ({path}).")
                by_key[key][seed] = r
    if dropped:
        raise SystemExit(f"--drop names cells no file holds: {sorted(':'.join(d) for d in dropped)}")
    sweep = {}
    for key, per in by_key.items():
        seeds = sorted(per)
        m = mean_curves([{key: per[s]} for s in seeds])[key]
        m["seed_list"] = seeds
        sweep[key] = m
    return sweep, settings or {}


def write_report(args, results: dict, n_eval: int, final: bool) -> None:
    """Write the JSON (after every variant, so a long run that is stopped keeps what it did);
    at the end also the table and the plot."""
    summary = summarize(results, n_eval, getattr(args, "sweep_results", None))
    sweep = getattr(args, "sweep_results", None)
    goal = goal_summary(sweep, n_eval) if sweep else {}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "command": "python benchmarks/convergence.py " + " ".join(sys.argv[1:]),
        "trainable": args.trainable,
        "budget": args.budget,
        "cached": args.cached,
        "seeds": args.seeds or [args.seed],
        "train_pool": args.train_pool if args.cached else None,
        "lr": args.lr,
        "eps": args.eps,
        "batch_size": args.batch_size,
        "n_eval": args.n_eval,
        "lr_sweep": args.lr_sweep if args.cached else None,
        "top_blocks": top_blocks(args),
        "trainable_params": getattr(args, "trainable_params", None),
        "threads": torch.get_num_threads(),
        "complete": final,
        "results": results,
        "summary": summary,
        "sweep_results": sweep,
        "goal": goal,
    }
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"convergence-{report_tag(args)}.json"
    out.write_text(json.dumps(report, indent=2))
    if not final:
        return
    print(f"\n{'variant':22s} {'final acc':>9s} {'fwd to MeZO acc':>16s} {'fraction':>9s}")
    for name, v in summary.get("variants", {}).items():
        frac = "-" if v["fraction_of_mezo_budget"] is None else f"{v['fraction_of_mezo_budget']:.2f}"
        hit = "-" if v["forwards_to_mezo_accuracy"] is None else str(v["forwards_to_mezo_accuracy"])
        print(f"{name:22s} {v['final_accuracy']:9.3f} {hit:>16s} {frac:>9s}")
    if results:
        print("\n" + markdown_table(report) + "\n")
    if summary:
        print(
            f"zero-shot {summary['start_accuracy']:.3f}; MeZO gain "
            f"{summary['mezo_gain_in_standard_errors']:.1f} standard errors ({summary['accuracy_standard_error']:.3f} each)"
        )
    png = args.plot_dir / f"convergence-{report_tag(args)}.png"
    if results and plot(results, png, caption(report)):
        print(f"plot: {png}")
    if goal:
        print("\n" + goal_table(goal) + "\n")
        png = args.plot_dir / f"convergence-{report_tag(args)}-goal.png"
        if plot_goal(sweep, goal, png, report_tag(args), note=caption(report)):
            print(f"plot: {png}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
