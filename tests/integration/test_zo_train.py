"""``zo-train`` (LightningCLI): a real fit on a tiny model + tiny local csv, the run's
artefacts, --print_config of every recipe, and the one-sentence errors."""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import pytest
import torch
import yaml

pytest.importorskip("lightning")
pytest.importorskip("datasets")

from zo_plugins.cli.train import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
WORDS = [
    "good",
    "bad",
    "fine",
    "awful",
    "movie",
    "plot",
    "the",
    "a",
    "was",
    "it",
    "very",
    "great",
    "terrible",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama + word-level tokenizer saved like a hub model, and a tiny sentiment csv."""
    import transformers as tf
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[EOS]", *WORDS, "It"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    model_dir = root / "tiny-llama"
    fast.save_pretrained(model_dir)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    tf.LlamaForCausalLM(cfg).save_pretrained(model_dir)
    rng = random.Random(0)
    for split, n in (("train", 48), ("validation", 16)):
        with open(root / f"{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["review", "sentiment"])
            for _ in range(n):
                pos = rng.random() < 0.5
                words = [rng.choice(["good", "fine"] if pos else ["bad", "awful"]), "movie", "the", "plot"]
                rng.shuffle(words)
                w.writerow([" ".join(words), "fresh" if pos else "rotten"])
    return {
        "model": model_dir,
        "train": root / "train.csv",
        "validation": root / "validation.csv",
        "root": root,
    }


def run_config(tiny, tmp_path, **model_overrides) -> Path:
    cfg = {
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_steps": 4,
            "val_check_interval": 2,
            "check_val_every_n_epoch": None,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(tmp_path / "run"),
            "logger": {
                "class_path": "lightning.pytorch.loggers.CSVLogger",
                "init_args": {"save_dir": str(tmp_path / "run")},
            },
            "strategy": {"class_path": "zo_plugins.lightning.ZOStrategy", "init_args": {"eps": 1e-2}},
        },
        "model": {
            "model_name_or_path": str(tiny["model"]),
            "template": "{text} It was",
            "label_words": [" great", " terrible"],
            "max_length": 32,
            "lr": 1e-2,
            **model_overrides,
        },
        "data": {
            "train_file": str(tiny["train"]),
            "validation_file": str(tiny["validation"]),
            "text_column": "review",
            "label_column": "sentiment",
            "label_map": {"rotten": 1, "fresh": 0},
            "batch_size": 8,
        },
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_fit_on_tiny_model_and_csv(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path)
    from transformers import AutoModelForCausalLM

    before = AutoModelForCausalLM.from_pretrained(tiny["model"]).state_dict()
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "4"])
    run = tmp_path / "run"
    metrics = list(csv.DictReader(open(next(run.rglob("metrics.csv")))))
    keys = set().union(*(r.keys() for r in metrics))
    assert {"projected_grad", "loss_plus", "loss_minus", "train_loss", "val_acc", "val_f1"} <= keys
    steps = {int(r["step"]) for r in metrics if r.get("projected_grad")}
    assert steps == {0, 1, 2, 3}, "--trainer.max_steps 4 overrides the YAML and every step is logged"
    assert any(run.rglob("config.yaml")), "the resolved config is saved with the run"
    ckpts = list(run.rglob("*.ckpt"))
    assert ckpts, "a checkpoint is written"
    state = torch.load(ckpts[0], weights_only=False)
    assert state["global_step"] == 4 and "zo_plugins" in state
    moved = [
        k for k, v in state["state_dict"].items() if not torch.equal(v, before[k.removeprefix("model.")])
    ]
    assert moved, "the weights moved"


def test_fit_with_lora_adapter(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, peft={"method": "lora", "r": 2, "target_modules": ["q_proj", "v_proj"]})
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1"])
    state = torch.load(next((tmp_path / "run").rglob("*.ckpt")), weights_only=False)
    lora_b = {k: v for k, v in state["state_dict"].items() if "lora_B" in k}
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b.values()), "LoRA B (zero at init) was trained"


def test_fit_a_quantized_model_trains_its_scales(tiny, tmp_path):
    """model.quantization loads the weights 4-bit (bitsandbytes NF4); with no adapter the
    strategy trains the quantization scales: they ride in the checkpoint's ZO state, they
    moved, and the 4-bit codes did not."""
    pytest.importorskip("bitsandbytes")
    import transformers as tf

    quant = {"method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    cfg = run_config(tiny, tmp_path, quantization={**quant, "bnb_4bit_compute_dtype": "float32"})
    main(["fit", "--config", str(cfg), "--trainer.max_steps", "2", "--trainer.val_check_interval", "1"])
    state = torch.load(next((tmp_path / "run").rglob("*.ckpt")), weights_only=False)
    scales = state["zo_plugins"]["state"]["scales"]
    assert len(scales) == 14 and all(k.endswith(".weight.absmax") for k in scales)
    base = tf.AutoModelForCausalLM.from_pretrained(
        tiny["model"],
        quantization_config=tf.BitsAndBytesConfig(**quant, bnb_4bit_compute_dtype=torch.float32),
        device_map="cpu",
    )
    base_sd = base.state_dict()
    for k, v in scales.items():
        assert not torch.equal(v, base_sd[k.removeprefix("model.")]), k
        codes = k.removesuffix(".absmax")
        assert torch.equal(state["state_dict"][codes], base_sd[codes.removeprefix("model.")]), codes


QUANT_RECIPES = [p for p in RECIPES if "quantization" in (yaml.safe_load(p.read_text())["model"] or {})]


def test_the_quantized_recipes_are_shipped():
    assert {p.stem for p in QUANT_RECIPES} >= {"llama-2-7b-nf4-scales", "llama-2-7b-qlora"}


@pytest.mark.parametrize("recipe", QUANT_RECIPES, ids=[p.stem for p in QUANT_RECIPES])
def test_quantized_recipe_fits_on_a_tiny_model(recipe, tiny, tmp_path):
    """Each quantized recipe, unchanged but for the model, data and device, loads the model
    4-bit and trains what it says: the block scales (codes bit-identical) or the adapters
    (codes and scales bit-identical)."""
    pytest.importorskip("bitsandbytes")
    rec = yaml.safe_load(recipe.read_text())
    adapters = rec["model"].get("peft") is not None
    main(
        [
            "fit", "--config", str(recipe),
            "--trainer.accelerator", "cpu", "--trainer.max_steps", "2", "--trainer.val_check_interval", "1",
            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
            "--trainer.default_root_dir", str(tmp_path / "run"),
            "--model.model_name_or_path", str(tiny["model"]), "--model.max_length", "32",
            "--data.train_file", str(tiny["train"]), "--data.validation_file", str(tiny["validation"]),
            "--data.text_column", "review", "--data.label_column", "sentiment",
            "--data.label_map", '{"rotten": 0, "fresh": 1}', "--data.batch_size", "8",
        ]
    )  # fmt: skip
    state = torch.load(next((tmp_path / "run").rglob("*.ckpt")), weights_only=False)
    sd = state["state_dict"]
    scales = state["zo_plugins"]["state"].get("scales", {})
    import transformers as tf

    q = dict(rec["model"]["quantization"])
    q.pop("method")
    q["bnb_4bit_compute_dtype"] = getattr(torch, q["bnb_4bit_compute_dtype"])
    base = tf.AutoModelForCausalLM.from_pretrained(  # quantized from the recipe's dtype, as the run was
        tiny["model"],
        dtype=getattr(torch, rec["model"]["dtype"]),
        quantization_config=tf.BitsAndBytesConfig(**q),
        device_map="cpu",
    ).state_dict()

    def saved(k):  # PEFT nests the base model; a LoRA target's own weight becomes base_layer.weight
        head, _, tail = k.partition(".weight")
        keys = (
            f"model.{k}",
            f"model.base_model.model.{k}",
            f"model.base_model.model.{head}.base_layer.weight{tail}",
        )
        return next((sd[c] for c in keys if c in sd), None)

    codes = [k for k in base if k.endswith("proj.weight")]
    assert len(codes) == 14
    for k in codes:  # the packed 4-bit codes never change
        assert saved(k) is not None and torch.equal(saved(k), base[k]), k
    if adapters:  # nor, in a ZO QLoRA, the block scales
        absmax = [k for k in base if k.endswith("proj.weight.absmax")]
        assert len(absmax) == 14 and all(torch.equal(saved(k), base[k]) for k in absmax)
        assert not scales, "ZO QLoRA trains no scales"
        lora_b = [v for k, v in sd.items() if "lora_B" in k]
        assert len(lora_b) == 4 and all(v.abs().sum() > 0 for v in lora_b), "LoRA B (zero at init) moved"
    else:
        assert len(scales) == 14 and all(k.endswith(".weight.absmax") for k in scales)
        assert all(not torch.equal(v, base[k.removeprefix("model.")]) for k, v in scales.items())


def test_quantization_config_errors():
    from zo_plugins.cli.modules import ConfigError, _quantization_config

    with pytest.raises(ConfigError, match="quantization.method='gptq' is not one of"):
        _quantization_config({"method": "gptq"})
    with pytest.raises(ConfigError, match="bnb_4bit_compute_dtype='f8'"):
        _quantization_config({"method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_compute_dtype": "f8"})
    with pytest.raises(ConfigError, match="config='Int9Config' is not a torchao"):
        _quantization_config({"method": "torchao", "config": "Int9Config"})


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_prints_config(recipe, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(recipe), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert "ZO" in printed["trainer"]["strategy"]["class_path"]
    assert printed["model"]["model_name_or_path"]
    assert isinstance(printed["model"]["lr"], float) and isinstance(
        printed["trainer"]["strategy"]["init_args"]["eps"], float
    )


def test_recipes_exist():
    names = {p.stem for p in RECIPES}
    assert "quickstart" in names
    for family in ("opt", "llama", "mistral", "qwen", "phi", "roberta"):
        for method in ("full", "lora", "prefix"):
            assert any(n.startswith(family) and n.endswith(method) for n in names), (family, method)


def test_checkout_recipes_are_the_shipped_ones():
    from zo_plugins.cli.train import RECIPE_DIR, available_recipes

    assert (ROOT / "recipes").resolve() == RECIPE_DIR == ROOT / "zo_plugins" / "recipes"
    assert available_recipes() == [p.stem for p in RECIPES]


def print_config(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *argv, "--print_config"])
    assert exit_info.value.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize(
    "spelling", ["quickstart", "recipe:quickstart", "quickstart.yaml", "--config=quickstart"]
)
def test_recipe_by_name(spelling, capsys, tmp_path, monkeypatch):
    """A bare name (or recipe:NAME) resolves to the shipped recipe from any directory."""
    monkeypatch.chdir(tmp_path)
    by_path = print_config(capsys, "--config", str(RECIPES[0].parent / "quickstart.yaml"))
    argv = [spelling] if spelling.startswith("--") else ["--config", spelling]
    assert print_config(capsys, *argv) == by_path
    assert yaml.safe_load(by_path)["model"]["model_name_or_path"] == "smollm2-135m"


def test_unknown_recipe_lists_the_names(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("quikstart", "recipe:quikstart", "recipe:../quickstart"):
        with pytest.raises(SystemExit) as e:
            main(["fit", "--config", name])
        expect_one_sentence(e.value.code, f"--config {name!r} is neither a YAML file nor a shipped recipe")
        assert all(p.stem in e.value.code for p in RECIPES), e.value.code


def test_recipe_names_leave_files_and_inline_yaml_alone(tmp_path, monkeypatch):
    from zo_plugins.cli.train import resolve_recipes

    monkeypatch.chdir(tmp_path)
    (tmp_path / "quickstart").write_text("trainer: {max_steps: 1}\n")  # a local file wins over a recipe
    inline = "{trainer: {max_steps: 1}}"
    argv = ["fit", "-c", "quickstart", "--config", inline, "--config", "sub/x.yaml", "--model.lr", "1"]
    assert resolve_recipes(argv) == argv
    resolved = resolve_recipes(["fit", "-c", "recipe:quickstart", "--trainer.max_steps", "quickstart"])
    assert resolved[2] == str(ROOT / "zo_plugins" / "recipes" / "quickstart.yaml")
    assert resolved[4] == "quickstart", "only --config values are recipe names"


@pytest.mark.parametrize("package", ["datasets", "transformers", "jsonargparse"])
def test_missing_package_names_the_train_extra(package, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, package, None)  # import of it now fails, as if not installed
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", "quickstart", "--print_config"])
    expect_one_sentence(e.value.code, f"zo-train needs {package}: pip install 'zo-plugins[train]'.")


def expect_one_sentence(capsys_or_exc, needle: str) -> None:
    text = str(capsys_or_exc)
    assert needle in text, text
    assert text.count("\n") == 0, f"not one sentence: {text}"


def test_error_missing_model_path(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, model_name_or_path=str(tmp_path / "no" / "such-model"))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    expect_one_sentence(e.value.code, "does not exist")


def test_error_template_without_text_slot(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, template="It was")
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    expect_one_sentence(e.value.code, "{text}")


def test_error_multi_token_label_word(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, label_words=[" very good", " bad"])
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    expect_one_sentence(e.value.code, "' very good' is 2 tokens")


def test_error_unknown_class_path(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--trainer.strategy", "zo_plugins.lightning.ZOStrategie"])
    expect_one_sentence(e.value.code, "unknown class_path 'zo_plugins.lightning.ZOStrategie'")
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"]["logger"]["class_path"] = "lightning.pytorch.loggers.CSVLoger"
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    expect_one_sentence(e.value.code, "trainer.logger")


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.stem != "quickstart"], ids=lambda p: p.stem)
def test_hf_config_matches_recipe(recipe):
    """configs/hf/<recipe>.json builds TrainingArguments and a ZOConfig with the recipe's
    learning rate, eps, batch size and step count (the HF and Lightning paths start alike)."""
    import json

    from transformers import TrainingArguments

    from zo_plugins import ZOConfig

    cfg = json.loads((ROOT / "configs" / "hf" / f"{recipe.stem}.json").read_text())
    rec = yaml.safe_load(recipe.read_text())
    args = TrainingArguments(**{**cfg["training_args"], "use_cpu": True})
    zo = ZOConfig(**cfg["zo"])
    assert args.learning_rate == rec["model"]["lr"]
    assert args.per_device_train_batch_size == rec["data"]["batch_size"]
    assert args.max_steps == rec["trainer"]["max_steps"]
    assert zo.eps == float(rec["trainer"]["strategy"]["init_args"]["eps"])
    assert cfg["model_name_or_path"] == rec["model"]["model_name_or_path"]
    assert cfg["peft"] == rec["model"].get("peft")


def test_error_typo_in_a_recipe_key(tiny, tmp_path, capsys):
    """A typo'd key in the YAML is refused with an error naming it, before any training."""
    cfg = run_config(tiny, tmp_path)
    doc = yaml.safe_load(cfg.read_text())
    doc["trainer"]["max_step"] = doc["trainer"].pop("max_steps")
    cfg.write_text(yaml.safe_dump(doc))
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "max_step" in err, err
    assert not list(tmp_path.rglob("*.ckpt")), "nothing may be trained"


def test_trainable_patterns_freeze_the_rest(tiny, tmp_path):
    cfg = run_config(tiny, tmp_path, trainable=["model.norm.weight"])
    main(["fit", "--config", str(cfg)])
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    state = torch.load(ckpt, weights_only=False, map_location="cpu")["state_dict"]
    import transformers as tf

    base = tf.LlamaForCausalLM.from_pretrained(tiny["model"]).state_dict()
    changed = {
        k.removeprefix("model.")
        for k, v in state.items()
        if not torch.equal(v, base[k.removeprefix("model.")])
    }
    assert changed == {"model.norm.weight"}, changed
    with pytest.raises(SystemExit) as e:
        main(["fit", "--config", str(cfg), "--model.trainable", '["no.such.*"]'])
    expect_one_sentence(e.value.code, "matches no parameter")


def test_fit_with_disk_offload_equals_the_in_memory_run(tiny, tmp_path, caplog):
    """zo-train's prompt-classification loss is computed from the label-word logits, not by the
    model: the one-visit schedule answers the model call once per half, so offloading to disk
    gives the in-memory run's checkpoint bit for bit."""
    states = []
    for name, extra in (("mem", []), ("disk", ["--trainer.strategy.init_args.offload", "disk"])):
        (tmp_path / name).mkdir()
        cfg = run_config(tiny, tmp_path / name)
        if extra:
            extra += ["--trainer.strategy.init_args.offload_dir", str(tmp_path / "blocks")]
        with caplog.at_level(logging.WARNING, logger="zo_plugins"):
            main(["fit", "--config", str(cfg), "--trainer.max_steps", "3", *extra])
        states.append(torch.load(next((tmp_path / name / "run").rglob("*.ckpt")), weights_only=False))
    mem, disk = states
    assert "one-visit schedule does not apply" not in caplog.text
    assert disk["zo_plugins"]["config"]["offload"] == "disk"
    assert any(not torch.equal(v, 0 * v) for v in disk["state_dict"].values())
    for k, v in mem["state_dict"].items():
        assert torch.equal(v, disk["state_dict"][k]), k
    assert sorted(p.name for p in (tmp_path / "blocks").glob("block-*.safetensors")) == [
        "block-00000.safetensors",
        "block-00001.safetensors",
    ]
