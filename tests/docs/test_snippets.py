"""Every code block of README.md and docs/*.md runs, or is checked, in the suite.

Conventions (also in docs/contributing.md), read from the Markdown itself:

* Each fenced block names its language: ``python``, ``bash``, ``yaml``, ``json`` or ``text``. A block
  in another language, or none, fails ``test_every_block_is_classified``.
* ``python`` blocks are executed as written, each in a fresh temporary working directory, in a
  namespace that holds tiny stand-ins for the names a snippet does not define itself:
  ``model`` (a 2-layer, 16-wide random Llama), ``batch``, ``loader`` (2 batches of 4),
  ``train``/``dev`` (and ``train_ds``, ``dev_ds``, ``ds``, ``dataset``: lists of token rows),
  ``args`` (``TrainingArguments``, 2 steps), ``tok``/``tokenizer``, ``my_loss``,
  ``build_model()``, and a saved copy of the starting weights in ``./base-model`` (``path``
  names it). Imports are
  the snippet's job: the namespace holds no modules. ``<!-- snippet: setup=NAME -->`` picks
  another namespace (``NAMESPACES`` in snippet_namespaces.py), ``<!-- snippet: continue -->`` continues the
  previous python block of the page, ``<!-- snippet: launch=N -->`` runs it in N torchrun
  processes (``launch_group``). Only the scale changes: every ``TrainingArguments``
  (and ``SFTConfig``) is capped at ``MAX_STEPS`` steps and reports nowhere.
* ``bash`` blocks are checked command by command: scripts named (``bash X.sh``,
  ``python X.py``) must exist and every ``--flag`` given to a Python script must be defined in
  its source; ``zo-train`` commands run with ``--print_config`` (the config is resolved,
  nothing trains); ``zo-replay``, ``torchrun`` and ``accelerate launch`` flags are compared with
  their ``--help``; ``pip install`` extras must exist in pyproject.toml. A command this file
  has no rule for fails the test, so a new kind of command gets a rule, not a silent pass.
  ``<!-- snippet: files=train.py -->`` names files that are the reader's own.
* ``json`` blocks are parsed. ``yaml`` blocks are parsed; a zo-train config (``trainer``/``model``/``data`` keys) is
  resolved with ``zo-train fit --config FILE --print_config``.
* ``<!-- snippet: skip=REASON -->`` leaves a block out, with a reason the suite lists
  (``test_skipped_blocks_are_few_and_explained``).

The site itself is built with ``mkdocs build --strict`` when MkDocs is installed (the
``docs`` extra, part of ``dev``), so a broken link or API reference fails the suite too.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from docs_snippets import (
    LANGUAGES,
    ROOT,
    all_blocks,
    bash_commands,
    doc_pages,
    extract_blocks,
    flags_of,
    python_groups,
    script_flags,
)
from snippet_namespaces import MAX_STEPS, NAMESPACES, capped_post_init
from zo_testing import free_port, torchrun_cmd_for

BLOCKS = all_blocks()
GROUPS = python_groups(BLOCKS)
MAX_SKIPPED = 8


@pytest.fixture
def snippet_env(tmp_path, monkeypatch):
    """A temporary working directory, the step cap, and the method registries restored after
    the block (a snippet may register an estimator); a process group a snippet started is
    destroyed."""
    from transformers import TrainingArguments

    from zo_plugins.core import registry

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(TrainingArguments, "__post_init__", capped_post_init(TrainingArguments.__post_init__))
    saved = {
        name: dict(table)
        for name, table in vars(registry).items()
        if isinstance(table, dict) and name.isupper()
    }
    torch.manual_seed(0)
    yield tmp_path
    for name, table in saved.items():
        current = getattr(registry, name)
        current.clear()
        current.update(table)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---- classification and skips ------------------------------------------------------------


def test_blocks_are_found():
    pages = {b.page.name for b in BLOCKS}
    assert {"README.md", "core.md", "hf.md", "lightning.md"} <= pages
    assert sum(b.lang == "python" for b in BLOCKS) >= 15


def test_every_block_is_classified():
    bad = [f"{b.id} ({b.lang or 'no language'})" for b in BLOCKS if b.lang not in LANGUAGES]
    assert not bad, f"name a language ({', '.join(sorted(LANGUAGES))}) on these fenced blocks: {bad}"


def test_directives_are_known():
    known = {"setup", "continue", "skip", "files", "launch"}
    bad = [f"{b.id}: {k}" for b in BLOCKS for k in b.directives if k not in known]
    assert not bad, f"unknown snippet directives {bad} (known: {sorted(known)})"
    bad_setup = [b.id for b in BLOCKS if b.directives.get("setup", "tiny") not in NAMESPACES]
    assert not bad_setup, f"unknown setup= namespaces at {bad_setup}: {sorted(NAMESPACES)}"


def test_skipped_blocks_are_few_and_explained():
    skipped = [b for b in BLOCKS if "skip" in b.directives]
    for b in skipped:
        assert len(b.directives["skip"]) >= 20, f"{b.id}: say why the block cannot run here"
    listing = "\n".join(f"  {b.id} [{b.lang}]: {b.directives['skip']}" for b in skipped)
    print(f"\n{len(skipped)} doc blocks not run:\n{listing}")
    assert len(skipped) <= MAX_SKIPPED, f"{len(skipped)} skipped blocks (at most {MAX_SKIPPED}):\n{listing}"


def test_extraction_reads_fences_and_directives(tmp_path):
    page = tmp_path / "p.md"
    page.write_text(
        "text\n\n<!-- snippet: setup=tiny_opt; files=a.py -->\n```python\nx = 1\n```\n\n"
        "````text\n```python\nnot a block\n```\n````\n\n<!--\nsnippet: skip=a reason long enough to say why\n-->\n"
        "```bash\nls\n```\n"
    )
    blocks = extract_blocks(page)
    assert [(b.lang, b.line) for b in blocks] == [("python", 4), ("text", 8), ("bash", 17)]
    assert blocks[0].directives == {"setup": "tiny_opt", "files": "a.py"}
    assert blocks[0].code == "x = 1\n"
    assert "not a block" in blocks[1].code and blocks[1].directives == {}
    assert blocks[2].directives["skip"].startswith("a reason")
    assert bash_commands("A=1 python x.py --a 1 && bash y.sh # c\nz \\\n --b") == [
        ["python", "x.py", "--a", "1"],
        ["bash", "y.sh"],
        ["z", "--b"],
    ]


# ---- python ----------------------------------------------------------------------------


@pytest.mark.parametrize("group", GROUPS, ids=[g[0].id for g in GROUPS])
def test_python_block_runs(group, snippet_env, monkeypatch):
    first = group[0]
    if "skip" in first.directives:
        pytest.skip(first.directives["skip"])
    if "launch" in first.directives:
        launch_group(group, int(first.directives["launch"]), snippet_env)
    else:
        run_group(group, monkeypatch)


def launch_group(group, nproc: int, out: Path) -> list[dict]:
    """Run a ``launch=N`` block in N torchrun processes (gloo, CPU); every rank must end with
    bit-identical weights, trained away from the start."""
    first = group[0]
    cmd = torchrun_cmd_for(
        Path(__file__).with_name("snippet_worker.py"), first.page, first.line, out, nproc=nproc
    )
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="", MASTER_ADDR="127.0.0.1")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(
            f"{first.id}: {nproc} processes still running after 300 s:\n{e.stderr}"
        ) from None
    assert proc.returncode == 0, f"{first.id} under torchrun:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(nproc)]
    assert [r["world"] for r in ranks] == [nproc] * nproc, f"{first.id} started no process group of {nproc}"
    for r in ranks[1:]:
        for name, t in ranks[0]["params"].items():
            assert torch.equal(t.view(torch.uint8), r["params"][name].view(torch.uint8)), (
                f"{first.id}: rank {r['rank']} ends with other bits in {name}"
            )
    moved = [n for n, t in ranks[0]["params"].items() if not torch.equal(t, ranks[0]["start"][n])]
    assert moved, f"{first.id}: the block trained nothing"
    return ranks


def run_group(group, monkeypatch) -> dict:
    """Run a python block and the blocks that continue it in one namespace; returns it."""
    ns = NAMESPACES[group[0].directives.get("setup", "tiny")]()
    if any("init_process_group" in b.code for b in group):
        # what torchrun would set, for one process (set after the namespace is built, so the
        # HF objects in it do not start a process group of their own)
        for k, v in {
            "RANK": "0",
            "LOCAL_RANK": "0",
            "WORLD_SIZE": "1",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()),
        }.items():
            monkeypatch.setenv(k, v)
    for block in group:
        if "skip" in block.directives:
            continue
        code = compile(block.code, block.id, "exec")
        with contextlib.redirect_stdout(io.StringIO()):
            exec(code, ns)
    return ns


def test_the_runner_fails_a_broken_block_and_continues_a_namespace(tmp_path, snippet_env, monkeypatch):
    page = tmp_path / "p.md"
    page.write_text(
        "```python\nsteps = args.max_steps\n```\n\n<!-- snippet: continue -->\n```python\nx = steps + 1\n```\n\n"
        "<!-- snippet: setup=none -->\n```python\nmodel\n```\n"
    )
    groups = python_groups(extract_blocks(page))
    assert [len(g) for g in groups] == [2, 1]
    assert run_group(groups[0], monkeypatch)["x"] == MAX_STEPS + 1  # the cap applies, names carry over
    with pytest.raises(NameError):
        run_group(groups[1], monkeypatch)  # setup=none: no stand-ins


def test_launched_blocks_must_agree_across_ranks(tmp_path, snippet_env):
    page = tmp_path / "p.md"
    page.write_text(
        "<!-- snippet: launch=2 -->\n```python\nimport torch\nimport torch.distributed as dist\n"
        "dist.init_process_group('gloo')\nmodel = build_model()\nwith torch.no_grad():\n"
        "    next(model.parameters()).add_(dist.get_rank())\n```\n"
    )
    (group,) = python_groups(extract_blocks(page))
    with pytest.raises(AssertionError, match="rank 1 ends with other bits"):
        launch_group(group, 2, tmp_path)


# ---- bash -------------------------------------------------------------------------------


def _help_text(argv: list[str]) -> str:
    """``zo-replay --help``, read in this process."""
    from zo_plugins.cli.replay import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        main(["--help"])
    return out.getvalue()


def _launcher_parser(argv: list[str]):
    if argv[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        return get_args_parser()
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


def _zo_train(argv: list[str]) -> str:
    from zo_plugins.cli.train import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code in (0, None), f"zo-train {' '.join(argv)} failed: {exit_info.value.code}"
    return out.getvalue()


def _pyproject_extras() -> set[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])


def _check_path(arg: str, user_files: set[str], where: str) -> bool:
    """True when ``arg`` is a file in the repository; False for one of the reader's own."""
    if arg in user_files:
        return False
    assert (ROOT / arg).exists(), (
        f"{where}: {arg} does not exist in the repository (files= names the reader's own)"
    )
    return True


def check_command(cmd: list[str], user_files: set[str], where: str, tmp: Path) -> str:
    """Check one command of a bash block; returns what was checked (for the test's report)."""
    head = cmd[0]
    if head == "bash":
        _check_path(cmd[1], user_files, where)
        return f"exists: {cmd[1]}"
    if head in ("python", "python3"):
        if cmd[1] == "-m":
            assert cmd[2] in ("pytest", "pip"), f"{where}: no rule for python -m {cmd[2]}"
            return f"module {cmd[2]}"
        if cmd[1] == "-c":
            return "inline code"
        if _check_path(cmd[1], user_files, where):
            missing = set(flags_of(cmd[2:])) - script_flags(ROOT / cmd[1])
            assert not missing, f"{where}: {cmd[1]} defines no option {sorted(missing)}"
        return f"flags of {cmd[1]}"
    if head == "zo-train":
        for i, tok in enumerate(cmd):
            if tok == "--config" and cmd[i + 1] in user_files:
                return "user config"  # the reader's own YAML file
        argv = list(cmd[1:])
        if "--print_config" not in argv:
            argv.append("--print_config")
        printed = yaml.safe_load(_zo_train(argv))
        assert "trainer" in printed and "model" in printed, f"{where}: {printed}"
        return "zo-train --print_config"
    if head == "torchrun" or cmd[:2] == ["accelerate", "launch"]:
        # the launcher's own parser reads the line (options after the script are the script's)
        parser = _launcher_parser(cmd)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                parser.parse_args(cmd[1 if head == "torchrun" else 2 :])
            except SystemExit:
                raise AssertionError(
                    f"{where}: {' '.join(cmd[:2])} has no option: {err.getvalue()[-300:]}"
                ) from None
        for arg in cmd:
            if arg.endswith((".py", ".sh", ".yaml", ".json")):
                _check_path(arg, user_files, where)
        return f"parsed by {head}"
    if head == "zo-replay":
        text = _help_text(cmd)
        missing = [f for f in flags_of(cmd) if f not in text]
        assert not missing, f"{where}: {' '.join(cmd[:2])} has no option {missing}"
        for arg in cmd:
            if arg.endswith((".py", ".sh", ".yaml", ".json")):
                _check_path(arg, user_files, where)
        return f"flags of {head}"
    if head == "pip":
        extras = _pyproject_extras()
        for arg in cmd:
            if arg.startswith("zo-plugins[") or arg.startswith(".["):
                named = arg[arg.index("[") + 1 : arg.index("]")].split(",")
                assert set(named) <= extras, f"{where}: no extra {set(named) - extras} in pyproject.toml"
        return "pip extras"
    if head == "mkdocs":
        assert cmd[1] in ("build", "serve"), where
        return "mkdocs"
    raise AssertionError(
        f"{where}: no rule checks the command {' '.join(cmd)!r}; add one to tests/docs/test_snippets.py "
        "or mark the block <!-- snippet: skip=REASON -->"
    )


BASH = [b for b in BLOCKS if b.lang == "bash"]


@pytest.mark.parametrize("block", BASH, ids=[b.id for b in BASH])
def test_bash_block_commands_exist(block, snippet_env):
    if "skip" in block.directives:
        pytest.skip(block.directives["skip"])
    user_files = {f.strip() for f in block.directives.get("files", "").split(",") if f.strip()}
    commands = bash_commands(block.code)
    assert commands, f"{block.id}: an empty bash block"
    for cmd in commands:
        check_command(cmd, user_files, block.id, snippet_env)


def test_bash_checks_catch_a_wrong_flag_and_a_missing_script(snippet_env):
    with pytest.raises(AssertionError, match="defines no option"):
        check_command(["python", "benchmarks/step_cost.py", "--no-such-flag"], set(), "t", snippet_env)
    with pytest.raises(AssertionError, match="does not exist"):
        check_command(["bash", "scripts/no_such.sh"], set(), "t", snippet_env)
    with pytest.raises(AssertionError, match="has no option"):
        check_command(["torchrun", "--nproc-per-gpu", "2", "train.py"], {"train.py"}, "t", snippet_env)
    with pytest.raises(AssertionError, match="has no option"):
        check_command(["accelerate", "launch", "--multi_gpus", "train.py"], {"train.py"}, "t", snippet_env)
    with pytest.raises(AssertionError, match="has no option"):
        check_command(["zo-replay", "B", "L", "O", "--stepz", "3"], set(), "t", snippet_env)
    with pytest.raises(AssertionError, match="no rule"):
        check_command(["rm", "-rf", "x"], set(), "t", snippet_env)


# ---- yaml --------------------------------------------------------------------------------

YAML = [b for b in BLOCKS if b.lang == "yaml"]


@pytest.mark.parametrize("block", YAML, ids=[b.id for b in YAML])
def test_yaml_block_parses_and_resolves(block, snippet_env):
    if "skip" in block.directives:
        pytest.skip(block.directives["skip"])
    doc = yaml.safe_load(block.code)
    assert isinstance(doc, dict), f"{block.id}: not a mapping"
    if {"trainer", "model"} & set(doc):
        path = snippet_env / "snippet.yaml"
        path.write_text(block.code)
        printed = yaml.safe_load(_zo_train(["fit", "--config", str(path), "--print_config"]))
        for key, value in doc.get("model", {}).items():
            if not isinstance(value, dict | list):
                assert printed["model"][key] == value, (block.id, key)


JSON = [b for b in BLOCKS if b.lang == "json"]


def test_json_blocks_parse():
    """Every ``json`` block is valid JSON (one test for them all: the docs may hold none)."""
    import json

    bad = []
    for block in JSON:
        if "skip" in block.directives:
            continue
        try:
            json.loads(block.code)
        except json.JSONDecodeError as e:
            bad.append(f"{block.id}: {e}")
    assert not bad, f"json blocks that do not parse: {bad}"


# ---- the site ----------------------------------------------------------------------------


def test_recipes_page_is_current():
    proc = subprocess.run(
        [sys.executable, "scripts/recipes_page.py", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr


def test_api_reference_covers_the_public_api():
    import zo_plugins
    import zo_plugins.distributed
    import zo_plugins.lightning

    api = (ROOT / "docs" / "api.md").read_text()
    skip = {"__version__", "ESTIMATORS", "UPDATE_RULES", "QUANTIZED_MODES", "SUPPORTED"}
    names = set(zo_plugins.__all__) | set(zo_plugins.lightning.__all__) | set(zo_plugins.distributed.__all__)
    missing = sorted(
        n
        for n in names - skip
        if not any(
            f".{n}" in line or f" {n}," in line or f"[{n}," in line or f" {n}]" in line
            for line in api.splitlines()
            if line.strip().startswith(("::: ", "members:"))
        )
    )
    assert not missing, f"docs/api.md documents no {missing}"


def test_nav_names_existing_pages():
    cfg = (ROOT / "mkdocs.yml").read_text()
    pages = {p.name for p in (ROOT / "docs").glob("*.md")}
    import re

    named = set(re.findall(r":\s*([\w.-]+\.md)\s*$", cfg, re.M))
    optional = {"quantized.md"}
    assert named - pages <= optional, f"mkdocs.yml names missing pages {named - pages - optional}"
    assert pages - named == set(), f"pages missing from the nav in mkdocs.yml: {pages - named}"


def test_site_builds_strict(tmp_path):
    pytest.importorskip("mkdocs", reason="MkDocs is not installed: pip install 'zo-plugins[docs]'")
    pytest.importorskip("mkdocstrings")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    built = {p.parent.name for p in (tmp_path / "site").glob("*/index.html")}
    assert {"api", "quickstart", "recipes", "core", "hf"} <= built
    api = (tmp_path / "site" / "api" / "index.html").read_text()
    assert 'id="zo_plugins.core.optimizer.ZOOptimizer"' in api and "ZOCallback" in api
    import dataclasses

    from zo_plugins import ZOConfig

    missing = [f.name for f in dataclasses.fields(ZOConfig) if f"<code>{f.name}</code>" not in api]
    assert not missing, f"the API page lists no ZOConfig field {missing}"
    assert (tmp_path / "site" / "search" / "search_index.json").exists()
    for page in doc_pages()[1:]:
        assert page.stem == "index" or page.stem in built, f"{page.name} was not built"
    shutil.rmtree(tmp_path / "site")


def test_optional_pages_leave_the_nav_only_when_absent(tmp_path):
    pytest.importorskip("mkdocs")
    import importlib.util

    spec = importlib.util.spec_from_file_location("zo_mkdocs_hooks", ROOT / "scripts" / "mkdocs_hooks.py")
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    nav = [{"Home": "index.md"}, {"Guides": [{"Quantized models": "quantized.md"}, {"PEFT": "peft.md"}]}]
    assert hooks._prune(nav, tmp_path) == [{"Home": "index.md"}, {"Guides": [{"PEFT": "peft.md"}]}]
    (tmp_path / "quantized.md").write_text("# Quantized\n")
    assert hooks._prune(nav, tmp_path) == nav
    assert "| `eps` | `0.001` |" in hooks.zoconfig_table()
