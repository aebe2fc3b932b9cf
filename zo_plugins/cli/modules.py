"""The LightningModule and LightningDataModule behind ``zo-train``.

``HFTaskModule`` fine-tunes a Hugging Face model on one of three tasks:

* ``prompt-classification`` (MeZO's setting): each example is put into ``template`` (which
  must contain ``{text}``) and classified by the logits of one ``label_words`` token per
  class at the next position (causal LM) or at ``{mask}`` (masked LM, e.g. RoBERTa);
  the loss is the cross-entropy over those label-word logits.
* ``sequence-classification``: ``AutoModelForSequenceClassification`` with ``num_labels``.
* ``causal-lm``: next-token loss on the text.

``HFDataModule`` reads ``datasets`` from local csv / json / jsonl / parquet files or from a
Python callable, and yields lists of rows; the module tokenises them once per batch in
``on_before_batch_transfer`` (not inside ``training_step``, which ZO runs twice).

The module knows nothing about ZO: ``zo-train`` trains it with ``ZOStrategy``.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from . import INSTALL_TRAIN

try:
    import lightning.pytorch as pl
except ImportError as e:  # pragma: no cover - exercised only without lightning
    raise ImportError(f"zo-train needs Lightning: {INSTALL_TRAIN}.") from e

__all__ = [
    "ConfigError",
    "HFTaskModule",
    "HFDataModule",
    "rotten_tomatoes",
    "resolve_model_path",
    "MODEL_ALIASES",
]


class ConfigError(ValueError):
    """A setting a user can fix; ``zo-train`` prints it as one sentence, without a traceback."""


TASKS = ("prompt-classification", "sequence-classification", "causal-lm")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODEL_ALIASES = {"smollm2-135m": "smollm2_path"}
"""Names that resolve to the offline assets of ``zo_plugins.assets`` instead of the Hub."""


def _require(name: str) -> Any:
    """Import ``name`` (transformers, datasets), or say which extra brings it."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise ImportError(f"zo-train's model and data modules need {name}: {INSTALL_TRAIN}.") from e


def resolve_model_path(name: str) -> str:
    """A local directory for ``name``: an alias from ``MODEL_ALIASES``, an existing directory,
    or a Hub id returned unchanged.  A name that looks like a local path but does not exist
    raises ``FileNotFoundError`` with the fix."""
    if name in MODEL_ALIASES:
        from .. import assets

        return str(getattr(assets, MODEL_ALIASES[name])())
    path = Path(os.path.expanduser(name))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(
                f"Model directory {name!r} has no config.json: point model_name_or_path at a directory "
                "written by save_pretrained, or at a Hugging Face hub id such as facebook/opt-125m."
            )
        return str(path)
    # a hub id is "name" or "org/name"; anything else names a local path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name
    if looks_local:
        raise FileNotFoundError(
            f"Model path {name!r} does not exist: give an existing directory written by save_pretrained, "
            f"a Hugging Face hub id (e.g. facebook/opt-125m), or one of {sorted(MODEL_ALIASES)}."
        )
    return name


def _check_template(template: str | None, task: str) -> None:
    if template is None:
        if task == "prompt-classification":
            raise ConfigError("task='prompt-classification' needs a template, e.g. '{text} It was'.")
        return
    if "{text}" not in template:
        raise ConfigError(
            f"The template {template!r} has no {{text}} slot: put {{text}} where the example goes, "
            "e.g. '{text} It was'."
        )
    unknown = template.replace("{text}", "").replace("{mask}", "")
    if "{" in unknown or "}" in unknown:
        raise ConfigError(
            f"The template {template!r} has a slot other than {{text}} and {{mask}}: write literal braces "
            "as {{ and }}."
        )


class HFTaskModule(pl.LightningModule):
    """Hugging Face fine-tuning as a LightningModule (see the module docstring).

    Args:
        model_name_or_path: a directory written by ``save_pretrained``, a hub id, or
            ``smollm2-135m`` (the offline SmolLM2-135M-Instruct of ``zo_plugins.assets``).
        task: ``prompt-classification``, ``sequence-classification`` or ``causal-lm``.
        model_config: if given, build the model from this config dict (``model_type`` plus
            fields, random weights) instead of loading weights; the tokenizer still comes
            from ``tokenizer`` or ``model_name_or_path``.
        tokenizer: tokenizer directory or hub id (default: ``model_name_or_path``).
        dtype: weight dtype: ``float32``, ``bfloat16`` or ``float16``.
        quantization: load the weights quantized, through transformers' ``quantization_config``:
            ``{"method": "bitsandbytes", "load_in_4bit": true, "bnb_4bit_quant_type": "nf4"}``
            (any ``BitsAndBytesConfig`` field; dtype fields as strings, e.g.
            ``bnb_4bit_compute_dtype: float32``) or ``{"method": "torchao", "config":
            "Int8WeightOnlyConfig"}`` (a ``torchao.quantization`` config class and its keyword
            arguments).  With no ``peft`` adapter the strategy trains the quantization scales
            (``ZOConfig.quantized``, docs/quantized.md).
        peft: a PEFT adapter: ``{"method": "lora" | "prefix" | "prompt", **config fields}``
            (e.g. ``{"method": "lora", "r": 8, "lora_alpha": 16}``); only adapter weights train.
        template: prompt with ``{text}`` (and ``{mask}`` for masked LMs).
        label_words: one single-token word per class, in label order (MeZO: " terrible",
            " great" for sentiment).
        num_labels: classes for ``sequence-classification``.
        max_length: truncation length in tokens (the text is truncated, the template kept).
        lr: learning rate (the ZO-SGD step); ``weight_decay``: L2 decay.
        lr_schedule: ``constant`` (MeZO) or ``linear`` decay to 0 over ``trainer.max_steps``.
        trainable: train only the parameters whose names match one of these ``fnmatch``
            patterns (e.g. ``["model.norm.weight"]``, ``["*layernorm*"]``); the rest is frozen.
            Default: every parameter (or the PEFT adapter's).
    """

    def __init__(
        self,
        model_name_or_path: str = "smollm2-135m",
        task: Literal[
            "prompt-classification", "sequence-classification", "causal-lm"
        ] = "prompt-classification",
        model_config: dict[str, Any] | None = None,
        tokenizer: str | None = None,
        dtype: Literal["float32", "bfloat16", "float16"] = "float32",
        peft: dict[str, Any] | None = None,
        quantization: dict[str, Any] | None = None,
        template: str | None = "{text} It was",
        label_words: list[str] | None = None,
        num_labels: int = 2,
        max_length: int = 256,
        lr: float = 1e-6,
        weight_decay: float = 0.0,
        lr_schedule: Literal["constant", "linear"] = "constant",
        trainable: list[str] | None = None,
    ) -> None:
        super().__init__()
        if task not in TASKS:
            raise ConfigError(f"task={task!r} is not one of {TASKS}.")
        if dtype not in DTYPES:
            raise ConfigError(f"dtype={dtype!r} is not one of {sorted(DTYPES)}.")
        _check_template(template, task)
        if label_words is None and task == "prompt-classification":
            label_words = [" terrible", " great"]
        self.save_hyperparameters()
        self.task, self.template, self.max_length = task, template, max_length
        self.lr, self.weight_decay, self.lr_schedule = lr, weight_decay, lr_schedule
        self.masked = task == "prompt-classification" and "{mask}" in (template or "")
        self.quantization = _quantization_config(quantization)
        if self.quantization is not None and model_config is not None:
            raise ConfigError(
                "quantization needs real weights loaded from model_name_or_path; it cannot be combined with "
                "model_config (random weights)."
            )
        self.tokenizer, self.model = self._load(model_name_or_path, model_config, tokenizer, DTYPES[dtype])
        if self.quantization is not None:
            # bitsandbytes' 4-bit state_dict holds quant-state keys its modules do not load back
            # ("Unexpected key(s) ... weight.absmax"); the ZO checkpoint state restores the scales
            self.strict_loading = False
        self.label_ids: list[int] = []
        if task == "prompt-classification":
            self.label_ids = self._label_token_ids(label_words or [])
        if peft:
            self.model = _apply_peft(self.model, peft, task)
        if trainable:
            import fnmatch

            chosen = 0
            for name, p in self.model.named_parameters():
                p.requires_grad_(any(fnmatch.fnmatch(name, pat) for pat in trainable))
                chosen += p.requires_grad
            if not chosen:
                raise ConfigError(f"trainable={trainable!r} matches no parameter name of the model.")
        self._preds: list[torch.Tensor] = []
        self._labels: list[torch.Tensor] = []

    # ------------------------------------------------------------------ loading
    def _load(self, name: str, config: dict[str, Any] | None, tokenizer: str | None, dtype: torch.dtype):
        tf = _require("transformers")
        path = resolve_model_path(name)
        tok_path = resolve_model_path(tokenizer) if tokenizer else path
        try:
            tok = tf.AutoTokenizer.from_pretrained(tok_path)
        except OSError as e:
            raise FileNotFoundError(
                f"Could not load a tokenizer from {tok_path!r} ({type(e).__name__}): check the path or hub id, "
                "or set HF_HUB_OFFLINE=0 and network access to download it."
            ) from e
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        tok.padding_side = "right"
        auto = {
            "causal-lm": tf.AutoModelForCausalLM,
            "sequence-classification": tf.AutoModelForSequenceClassification,
            "prompt-classification": tf.AutoModelForMaskedLM if self.masked else tf.AutoModelForCausalLM,
        }[self.task]
        kwargs: dict[str, Any] = {}
        if self.task == "sequence-classification":
            kwargs["num_labels"] = self.hparams.num_labels
        if self.quantization is not None:
            kwargs["quantization_config"] = self.quantization
            if type(self.quantization).__name__ == "BitsAndBytesConfig" and not torch.cuda.is_available():
                kwargs["device_map"] = "cpu"  # bitsandbytes quantizes on the device the map names
        if config is not None:
            cfg = dict(config)
            model_type = cfg.pop("model_type", None)
            if model_type is None:
                raise ConfigError("model_config needs a model_type, e.g. {'model_type': 'llama', ...}.")
            model = auto.from_config(tf.AutoConfig.for_model(model_type, **cfg, **kwargs), dtype=dtype)
        else:
            try:
                model = auto.from_pretrained(path, dtype=dtype, **kwargs)
            except OSError as e:
                raise FileNotFoundError(
                    f"Could not load model {path!r} ({type(e).__name__}): check the path or hub id, or set "
                    "HF_HUB_OFFLINE=0 and network access to download it."
                ) from e
        if getattr(model.config, "pad_token_id", None) is None:
            model.config.pad_token_id = tok.pad_token_id
        model.train()  # from_pretrained returns eval mode; Lightning keeps submodule modes as found
        return tok, model

    def _label_token_ids(self, words: list[str]) -> list[int]:
        if len(words) < 2:
            raise ConfigError(f"label_words needs one word per class (at least 2); got {words!r}.")
        ids = []
        for w in words:
            toks = self.tokenizer(w, add_special_tokens=False)["input_ids"]
            if len(toks) != 1:
                pieces = self.tokenizer.convert_ids_to_tokens(toks)
                raise ConfigError(
                    f"The label word {w!r} is {len(toks)} tokens {pieces} for this tokenizer; prompt "
                    "classification scores one token per class: pick a single-token word (often with a "
                    "leading space, e.g. ' great')."
                )
            ids.append(toks[0])
        if len(set(ids)) != len(ids):
            raise ConfigError(f"Two label words map to the same token: {words!r}.")
        return ids

    # ------------------------------------------------------------------ batches
    def encode(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Tokenise a list of rows ``{"text": ..., "label": ...}`` into model inputs."""
        tok = self.tokenizer
        texts = [str(r["text"]) for r in rows]
        if self.template is not None and self.task != "causal-lm":
            mask = tok.mask_token or ""
            texts = [
                self.template.replace("{mask}", mask).replace("{text}", _clip(tok, t, self)) for t in texts
            ]
        enc = tok(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if self.task == "causal-lm":
            labels = enc["input_ids"].clone()
            labels[enc["attention_mask"] == 0] = -100
            batch["labels"] = labels
        else:
            batch["labels"] = torch.tensor([int(r["label"]) for r in rows], dtype=torch.long)
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        if isinstance(batch, list) and batch and isinstance(batch[0], dict):
            return self.encode(batch)
        return batch

    def _logits_and_loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor]:
        if self.task == "causal-lm":
            return None, self.model(**batch).loss
        if self.task == "sequence-classification":
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            logits = out.logits.float()
            return logits, F.cross_entropy(logits, batch["labels"])
        out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        logits = out.logits
        shift = logits.shape[1] - batch["input_ids"].shape[1]  # prompt tuning prepends tokens
        if self.masked:
            pos = (batch["input_ids"] == self.tokenizer.mask_token_id).int().argmax(dim=1)
        else:
            pos = batch["attention_mask"].sum(dim=1) - 1  # the last prompt token predicts the label
        rows = torch.arange(logits.shape[0], device=logits.device)
        scores = logits[rows, pos + shift][:, self.label_ids].float()
        return scores, F.cross_entropy(scores, batch["labels"])

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        _, loss = self._logits_and_loss(batch)
        self.log("train_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: dict[str, torch.Tensor], prefix: str) -> None:
        logits, loss = self._logits_and_loss(batch)
        self.log(f"{prefix}_loss", loss, prog_bar=True, batch_size=batch["input_ids"].shape[0])
        if logits is not None:
            self._preds.append(logits.argmax(dim=-1).cpu())
            self._labels.append(batch["labels"].cpu())

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")

    def _log_metrics(self, prefix: str) -> None:
        if not self._preds:
            return
        preds, labels = torch.cat(self._preds), torch.cat(self._labels)
        self._preds, self._labels = [], []
        n_classes = max(len(self.label_ids), self.hparams.num_labels)
        acc, f1 = accuracy_and_macro_f1(preds, labels, n_classes)
        self.log(f"{prefix}_acc", acc, prog_bar=True, sync_dist=True)
        self.log(f"{prefix}_f1", f1, sync_dist=True)

    def configure_optimizers(self) -> Any:
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.weight_decay}] if decay else []
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        opt = torch.optim.SGD(groups, lr=self.lr)
        if self.lr_schedule == "constant":
            return opt
        total = max(1, int(self.trainer.max_steps if self.trainer.max_steps > 0 else 1))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1.0 - s / total))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


_QUANT_METHODS = ("bitsandbytes", "torchao")


def _quantization_config(spec: dict[str, Any] | None) -> Any:
    """transformers' ``quantization_config`` for ``HFTaskModule(quantization=...)``."""
    if spec is None:
        return None
    spec = dict(spec)
    method = spec.pop("method", None)
    if method not in _QUANT_METHODS:
        raise ConfigError(f"quantization.method={method!r} is not one of {list(_QUANT_METHODS)}.")
    tf = _require("transformers")
    if method == "bitsandbytes":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ImportError(
                "quantization.method='bitsandbytes' needs bitsandbytes: pip install 'zo-plugins[quant]'."
            ) from e
        for k, v in list(spec.items()):
            if k.endswith("_dtype") and isinstance(v, str):
                if v not in DTYPES:
                    raise ConfigError(f"quantization.{k}={v!r} is not one of {sorted(DTYPES)}.")
                spec[k] = DTYPES[v]
        try:
            return tf.BitsAndBytesConfig(**spec)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"quantization: BitsAndBytesConfig refused {spec}: {e}") from e
    try:
        import torchao.quantization as aoq
    except ImportError as e:
        raise ImportError(
            "quantization.method='torchao' needs torchao: pip install 'zo-plugins[quant]'."
        ) from e
    name = spec.pop("config", "Int8WeightOnlyConfig")
    cls = getattr(aoq, str(name), None)
    if not isinstance(cls, type):
        raise ConfigError(
            f"quantization.config={name!r} is not a torchao.quantization config class (e.g. Int8WeightOnlyConfig)."
        )
    try:
        return tf.TorchAoConfig(cls(**spec))
    except (TypeError, ValueError) as e:
        raise ConfigError(f"quantization: {name}({spec}) failed: {e}") from e


def _clip(tok: Any, text: str, module: HFTaskModule) -> str:
    """Truncate the text (not the template) so the label position survives truncation."""
    room = max(8, module.max_length - len(tok(module.template or "", add_special_tokens=True)["input_ids"]))
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return text if len(ids) <= room else tok.decode(ids[:room])


def accuracy_and_macro_f1(preds: torch.Tensor, labels: torch.Tensor, n_classes: int) -> tuple[float, float]:
    """Accuracy and macro-averaged F1 over ``n_classes`` (classes never seen nor predicted are
    left out of the average)."""
    acc = float((preds == labels).float().mean()) if labels.numel() else float("nan")
    f1s = []
    for c in range(n_classes):
        tp = int(((preds == c) & (labels == c)).sum())
        fp = int(((preds == c) & (labels != c)).sum())
        fn = int(((preds != c) & (labels == c)).sum())
        if tp + fp + fn:
            f1s.append(2 * tp / (2 * tp + fp + fn))
    return acc, (sum(f1s) / len(f1s) if f1s else float("nan"))


_PEFT_METHODS = {"lora": "LoraConfig", "prefix": "PrefixTuningConfig", "prompt": "PromptTuningConfig"}


def _apply_peft(model: torch.nn.Module, spec: dict[str, Any], task: str) -> torch.nn.Module:
    try:
        import peft
    except ImportError as e:
        raise ImportError("A PEFT adapter needs peft: pip install 'zo-plugins[peft]'.") from e
    spec = dict(spec)
    method = spec.pop("method", None)
    if method not in _PEFT_METHODS:
        raise ConfigError(f"peft.method={method!r} is not one of {sorted(_PEFT_METHODS)}.")
    task_type = {"sequence-classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(task)
    if task == "prompt-classification":  # PEFT has no masked-LM task type: the generic PeftModel
        task_type = None if type(model).__name__.endswith("ForMaskedLM") else "CAUSAL_LM"
    cfg_cls = getattr(peft, _PEFT_METHODS[method])
    if task_type is not None:
        spec.setdefault("task_type", task_type)
    return peft.get_peft_model(model, cfg_cls(**spec))


# ---------------------------------------------------------------------- data
def _rows(batch: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return batch  # collate_fn: keep raw rows; the module tokenises them


def _import_callable(path: str) -> Callable[..., Any]:
    mod, _, attr = path.replace(":", ".").rpartition(".")
    try:
        return getattr(importlib.import_module(mod), attr)
    except (ImportError, AttributeError, ValueError) as e:
        raise ConfigError(
            f"loader={path!r} is not an importable callable: use 'package.module.function'."
        ) from e


_FORMATS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _format_of(path: str) -> str:
    p = Path(path)
    suffixes = [s for s in p.suffixes if s not in (".bz2", ".gz", ".xz", ".zst")]
    fmt = _FORMATS.get(suffixes[-1] if suffixes else "")
    if fmt is None:
        raise ConfigError(
            f"Cannot tell the format of {path!r}: use a .csv, .tsv, .json, .jsonl or .parquet file."
        )
    if not p.is_file():
        raise FileNotFoundError(f"Data file {path!r} does not exist.")
    return fmt


class HFDataModule(pl.LightningDataModule):
    """Text-classification / language-modelling data for ``HFTaskModule``.

    Args:
        train_file: a local csv, tsv, json, jsonl or parquet file (compressed csv such as
            ``.csv.bz2`` works).
        validation_file: the same, for the validation split.
        test_file: the same, for the test split.
        loader: instead of files, a callable (``"package.module.function"``) returning a
            ``datasets.DatasetDict`` or a dict of split name -> dataset / list of rows;
            ``loader_kwargs`` are passed to it.
        text_column: the column holding the text.
        label_column: the column holding the label.
        label_map: maps raw label values (e.g. ``"fresh"``) to class indices; rows whose label
            is not in it are dropped.  Without it labels must already be integers.
        num_train: keep only this many training examples (after a seeded shuffle), e.g.
            MeZO's k-shot 512 / 1000.
        num_validation: the same for the validation split.
        validation_fraction: carve a validation split out of train when none is given.
        batch_size: the per-device training batch size.
        eval_batch_size: the per-device evaluation batch size.
    """

    def __init__(
        self,
        train_file: str | None = None,
        validation_file: str | None = None,
        test_file: str | None = None,
        loader: str | None = None,
        loader_kwargs: dict[str, Any] | None = None,
        text_column: str = "text",
        label_column: str = "label",
        label_map: dict[str, int] | None = None,
        num_train: int | None = None,
        num_validation: int | None = None,
        validation_fraction: float | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if loader is None and train_file is None and validation_file is None and test_file is None:
            raise ConfigError(
                "HFDataModule needs data: give train_file (and validation_file) or a loader callable."
            )
        if loader is not None and (train_file or validation_file or test_file):
            raise ConfigError("Give either data files or a loader callable, not both.")
        self.save_hyperparameters()
        self.splits: dict[str, Any] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        datasets = _require("datasets")

        hp = self.hparams
        if hp.loader is not None:
            raw = _import_callable(hp.loader)(**(hp.loader_kwargs or {}))
            splits = {
                k: (v if isinstance(v, datasets.Dataset) else datasets.Dataset.from_list(list(v)))
                for k, v in raw.items()
            }
        else:
            files = {"train": hp.train_file, "validation": hp.validation_file, "test": hp.test_file}
            splits = {}
            for split, f in files.items():
                if f:
                    fmt = _format_of(f)
                    kw = {"delimiter": "\t"} if f.endswith((".tsv", ".tsv.bz2", ".tsv.gz")) else {}
                    splits[split] = datasets.load_dataset(fmt, data_files=f, split="train", **kw)
        for name, ds in list(splits.items()):
            splits[name] = self._prepare(ds, name)
        if "validation" not in splits and hp.validation_fraction and "train" in splits:
            parts = splits["train"].train_test_split(test_size=hp.validation_fraction, seed=hp.seed)
            splits["train"], splits["validation"] = parts["train"], parts["test"]
        for name, n in (("train", hp.num_train), ("validation", hp.num_validation)):
            if n is not None and name in splits and len(splits[name]) > n:
                splits[name] = splits[name].shuffle(seed=hp.seed).select(range(n))
        self.splits = splits

    def _prepare(self, ds: Any, split: str) -> Any:
        hp = self.hparams
        for col in (hp.text_column,):
            if col not in ds.column_names:
                raise ConfigError(
                    f"The {split} data has no column {col!r}; its columns are {ds.column_names}."
                )
        has_label = hp.label_column in ds.column_names
        if hp.label_map is not None and has_label:
            lm = {str(k): int(v) for k, v in hp.label_map.items()}
            ds = ds.filter(lambda r: str(r[hp.label_column]) in lm)
            ds = ds.map(lambda r: {"label": lm[str(r[hp.label_column])]})
        elif has_label and hp.label_column != "label":
            ds = ds.map(lambda r: {"label": r[hp.label_column]})
        if hp.text_column != "text":
            ds = ds.map(lambda r: {"text": r[hp.text_column]})
        keep = [c for c in ("text", "label") if c in ds.column_names]
        return ds.select_columns(keep)

    def _loader(self, split: str, train: bool) -> torch.utils.data.DataLoader:
        if split not in self.splits:
            raise ConfigError(
                f"No {split} data: give {split}_file, or a loader that returns a {split!r} split."
            )
        hp = self.hparams
        bs = hp.batch_size if train else (hp.eval_batch_size or hp.batch_size)
        g = torch.Generator().manual_seed(hp.seed)
        return torch.utils.data.DataLoader(
            self.splits[split],
            batch_size=bs,
            shuffle=train and hp.shuffle,
            generator=g,
            collate_fn=_rows,
            num_workers=hp.num_workers,
        )

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("train", True)

    def val_dataloader(self) -> torch.utils.data.DataLoader | list:
        return self._loader("validation", False) if "validation" in self.splits else []

    def test_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader("test", False)


def rotten_tomatoes(num_train: int = 1000, num_validation: int = 500, seed: int = 0) -> dict[str, Any]:
    """The offline Rotten Tomatoes snippets (``zo_plugins.assets``) as train / validation
    splits with ``text`` and ``label`` (0 = rotten, 1 = fresh); "plot" rows are dropped."""
    from .. import assets

    datasets = _require("datasets")

    ds = datasets.load_dataset("csv", data_files=str(assets.rotten_tomatoes_csv()), split="train")
    ds = ds.filter(lambda r: r["category"] in ("fresh", "rotten"))
    ds = ds.map(lambda r: {"label": int(r["category"] == "fresh")}).select_columns(["text", "label"])
    ds = ds.shuffle(seed=seed)
    n = min(len(ds), num_train + num_validation)
    return {
        "train": ds.select(range(min(num_train, n))),
        "validation": ds.select(range(min(num_train, n), n)),
    }
