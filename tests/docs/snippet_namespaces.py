"""The namespaces a docs snippet runs in (``<!-- snippet: setup=NAME -->``): tiny stand-ins for
the names a snippet does not define itself. Shared by test_snippets.py (in process) and
snippet_worker.py (one torchrun rank of a ``launch=N`` block)."""

from __future__ import annotations

import torch

MAX_STEPS = 2  # every TrainingArguments (and SFTConfig) of a snippet is capped at this


def capped_post_init(original):
    """``TrainingArguments.__post_init__`` with the snippets' cap: at most ``MAX_STEPS`` steps,
    reporting nowhere, no progress bars."""

    def capped(self, *a, **kw):
        original(self, *a, **kw)
        if self.max_steps < 0 or self.max_steps > MAX_STEPS:
            self.max_steps = MAX_STEPS
        self.report_to = []
        self.disable_tqdm = True

    return capped


def _collate(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def _tokenizer():
    from zo_testing import tiny_word_tokenizer

    return tiny_word_tokenizer()


def _hf_namespace(kind: str) -> dict:
    from transformers import TrainingArguments
    from zo_testing import lm_dataset, tiny_hf_model

    model = tiny_hf_model(kind)
    model.save_pretrained("base-model")
    rows = lm_dataset(n=16, length=12)
    train, dev = rows[:12], rows[12:]

    def my_loss(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits[:, :-1].flatten(0, 1)
        return torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten())

    args = TrainingArguments(
        output_dir="out",
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        max_steps=MAX_STEPS,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    return {
        "model": model,
        "build_model": lambda: tiny_hf_model(kind),
        "batch": _collate(rows[:4]),
        "loader": [_collate(rows[i : i + 4]) for i in (0, 4)],
        "train": train,
        "dev": dev,
        "train_ds": train,
        "dev_ds": dev,
        "ds": train,
        "dataset": train,
        "args": args,
        "my_loss": my_loss,
        "path": "base-model",  # a save_pretrained directory of the starting weights
        "tok": _tokenizer(),
        "tokenizer": _tokenizer(),
    }


def _sft_namespace() -> dict:
    import datasets

    ns = _hf_namespace("llama")
    g = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, 60, (10,), generator=g).tolist()} for _ in range(8)]
    ns["ds"] = ns["train"] = datasets.Dataset.from_list(rows)
    return ns


def _cls_namespace() -> dict:
    ns = _hf_namespace("llama")
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"][-1]} for r in ns["train"] + ns["dev"]]
    ns.update(
        train=rows[:12],
        dev=rows[12:],
        train_ds=rows[:12],
        dev_ds=rows[12:],
        ds=rows[:12],
        dataset=rows[:12],
        batch=_collate(rows[:4]),
        loader=[_collate(rows[i : i + 4]) for i in (0, 4)],
    )
    return ns


NAMESPACES = {
    "none": dict,
    "tiny": lambda: _hf_namespace("llama"),  # the default
    "tiny_opt": lambda: _hf_namespace("opt"),  # model.model.decoder.layers, for FSDP2 snippets
    "tiny_cls": _cls_namespace,  # labels: one token id per row (classification objectives)
    "sft": _sft_namespace,  # ds: a datasets.Dataset of token ids, as TRL takes it
}
