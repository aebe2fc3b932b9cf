"""Packaging: every missing-package error names an extra that really holds the package, and a
wheel built from the checkout ships what an installed copy needs (LICENSE, py.typed, the
recipes, the entry points) and runs outside the checkout."""

from __future__ import annotations

import configparser
import importlib
import json
import os
import re
import shutil
import site
import subprocess
import sys
import time
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "zo_plugins"
INSTALL_LINE = re.compile(r"pip install '?zo-plugins\[([a-z0-9_,-]+)\]'?")


def pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower().replace("_", "-")


def extra_packages(extras: str) -> set[str]:
    """The distributions ``pip install 'zo-plugins[extras]'`` installs directly (self-references
    such as ``zo-plugins[hf]`` followed; the packages' own dependencies are not)."""
    project = pyproject()["project"]
    found = {_name(r) for r in project["dependencies"]}
    for extra in extras.split(","):
        assert extra in project["optional-dependencies"], f"no extra {extra!r} in pyproject.toml"
        for req in project["optional-dependencies"][extra]:
            if _name(req) == "zo-plugins":
                found |= extra_packages(re.search(r"\[(.*?)\]", req).group(1))
            else:
                found.add(_name(req))
    return found


def assert_names_extra_with(message: str, package: str) -> None:
    match = INSTALL_LINE.search(message)
    assert match, f"no pip install 'zo-plugins[...]' line in: {message}"
    assert package in extra_packages(match.group(1)), (
        f"{match.group(0)} does not install {package}: {message}"
    )
    assert "\n" not in message.strip(), message


def block(monkeypatch, package: str) -> None:
    """Make ``package`` (and its loaded submodules) fail to import, as if not installed."""
    for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def set_aside(monkeypatch, module: str) -> None:
    """Forget the imported ``module`` until the test ends, so the next import runs it anew."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    parent, _, attr = module.rpartition(".")
    if parent in sys.modules:
        monkeypatch.delattr(sys.modules[parent], attr, raising=False)


def fresh_import_error(monkeypatch, module: str) -> str:
    """The ImportError raised by importing ``module`` anew."""
    set_aside(monkeypatch, module)
    with pytest.raises(ImportError) as e:
        importlib.import_module(module)
    return str(e.value)


def test_extras_hold_what_each_entry_point_imports():
    from zo_plugins.cli import TRAIN_PACKAGES

    assert set(TRAIN_PACKAGES) <= extra_packages("train"), "zo-train's error names the train extra"
    assert {"transformers", "safetensors"} <= extra_packages("hf"), "zo-replay, zo_plugins.checkpoint"
    assert {"trl", "transformers"} <= extra_packages("trl")
    assert {"trl", "datasets", "lightning", "peft", "transformers", "setuptools"} <= extra_packages("dev")
    assert {"torchao", "bitsandbytes"} <= extra_packages("quant") <= extra_packages("dev")
    project = pyproject()["project"]
    assert project["license"] == "Apache-2.0" and project["license-files"] == ["LICENSE"]
    assert "version" in project["dynamic"] and "version" not in project
    backend = pyproject()["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(7[7-9]|[89]\d)(\.\d+)*", r) for r in backend), (
        f"PEP 639 license metadata needs setuptools>=77: {backend}"
    )


@pytest.mark.parametrize(
    "module,package",
    [
        ("zo_plugins.integrations.hf", "transformers"),
        ("zo_plugins.integrations.lightning", "lightning"),
        ("zo_plugins.cli.modules", "lightning"),
        ("zo_plugins.cli.train", "lightning"),
    ],
)
def test_import_errors_name_an_extra_that_holds_the_package(module, package, monkeypatch):
    block(monkeypatch, package)
    assert_names_extra_with(fresh_import_error(monkeypatch, module), package)


def test_zo_plugins_lightning_names_the_lightning_extra(monkeypatch):
    import zo_plugins.lightning as zl

    block(monkeypatch, "lightning")
    set_aside(monkeypatch, "zo_plugins.integrations.lightning")
    with pytest.raises(ImportError) as e:
        zl.ZOStrategy  # noqa: B018
    assert_names_extra_with(str(e.value), "lightning")


@pytest.mark.parametrize("package", ["datasets", "transformers"])
def test_zo_train_modules_name_the_train_extra(package, monkeypatch):
    from zo_plugins.cli.modules import HFDataModule, HFTaskModule

    data = HFDataModule(train_file="train.csv")
    block(monkeypatch, package)
    with pytest.raises(ImportError) as e:
        if package == "datasets":
            data.setup("fit")
        else:
            HFTaskModule(model_name_or_path="facebook/opt-125m")
    assert_names_extra_with(str(e.value), package)


def test_checkpoint_names_the_extra_with_safetensors(monkeypatch, tmp_path):
    from zo_plugins.checkpoint import load_checkpoint, save_checkpoint

    block(monkeypatch, "safetensors")
    for call in (save_checkpoint, load_checkpoint):
        with pytest.raises(ImportError) as e:
            call(tmp_path / "ckpt", torch.nn.Linear(2, 2))
        assert_names_extra_with(str(e.value), "safetensors")


def test_zo_replay_names_the_extras_with_transformers_and_peft(monkeypatch, tmp_path):
    from zo_plugins.cli.replay import load_base

    (tmp_path / "adapter_config.json").write_text("{}")
    block(monkeypatch, "peft")
    with pytest.raises(SystemExit) as e:
        load_base(str(tmp_path))
    assert_names_extra_with(str(e.value.code), "peft")
    block(monkeypatch, "transformers")
    with pytest.raises(SystemExit) as e:
        load_base(str(tmp_path))
    assert_names_extra_with(str(e.value.code), "transformers")


def test_every_install_line_names_existing_extras():
    """No message or doc names an extra that pyproject.toml does not define."""
    extras = set(pyproject()["project"]["optional-dependencies"])
    files = [*PACKAGE.rglob("*.py"), ROOT / "README.md", *(ROOT / "docs").glob("*.md")]
    seen = 0
    for path in files:
        for match in INSTALL_LINE.finditer(path.read_text()):
            seen += 1
            unknown = set(match.group(1).split(",")) - extras
            assert not unknown, f"{path.relative_to(ROOT)}: {match.group(0)} names no extra {unknown}"
    assert seen >= 10


# ---------------------------------------------------------------------------------------- the wheel
def _run(argv: list[str], cwd: Path, env: dict[str, str], timeout: int = 240) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the working tree (the build writes build/ and *.egg-info
    next to its sources: never into the checkout)."""
    from importlib.metadata import version

    assert int(version("setuptools").split(".")[0]) >= 77, "the dev extra installs setuptools>=77 (PEP 639)"
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, src / name)
    shutil.copytree(PACKAGE, src / "zo_plugins", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    out = _run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         str(root / "dist"), str(src)],
        cwd=root,
        env=dict(os.environ),
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    (whl,) = (root / "dist").glob("zo_plugins-*.whl")
    return whl


def test_wheel_contents(wheel):
    from zo_plugins import __version__
    from zo_plugins.cli.train import available_recipes

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = f"zo_plugins-{__version__}.dist-info"
        assert zf.read(f"{info}/licenses/LICENSE") == (ROOT / "LICENSE").read_bytes()
        assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]
        assert "zo_plugins/py.typed" in names
        shipped = sorted(n.removeprefix("zo_plugins/recipes/") for n in names if "/recipes/" in n)
        assert shipped == [f"{r}.yaml" for r in available_recipes()] and len(shipped) >= 19
        for name in shipped:
            assert zf.read(f"zo_plugins/recipes/{name}") == (PACKAGE / "recipes" / name).read_bytes()
        modules = {n for n in names if n.endswith(".py")}
        in_tree = {f"zo_plugins/{p.relative_to(PACKAGE).as_posix()}" for p in PACKAGE.rglob("*.py")}
        assert modules == in_tree, f"not shipped: {in_tree - modules}; extra: {modules - in_tree}"
        assert all(n.startswith(("zo_plugins/", f"{info}/")) for n in names), sorted(names)
        entry_points = configparser.ConfigParser()
        entry_points.read_string(zf.read(f"{info}/entry_points.txt").decode())
        assert dict(entry_points["console_scripts"]) == pyproject()["project"]["scripts"]
        assert dict(entry_points["console_scripts"]) == {
            "zo-train": "zo_plugins.cli.train:main",
            "zo-replay": "zo_plugins.cli.replay:main",
        }
        meta = Parser().parsestr(zf.read(f"{info}/METADATA").decode())
    assert meta["Version"] == __version__
    assert meta["License-Expression"] == "Apache-2.0" and meta.get_all("License-File") == ["LICENSE"]
    assert {"hf", "train", "trl", "lightning", "dev"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    assert 'datasets>=5.2; extra == "train"' in requires and 'trl>=1.16; extra == "trl"' in requires


@pytest.mark.slow
def test_wheel_installed_outside_the_checkout_runs(wheel, tmp_path):
    """Install the wheel into a fresh venv and run its console scripts from a directory
    outside the checkout.  The venv reaches torch, lightning, ... through a .pth line naming
    this environment's site-packages; .pth files inside that directory are not processed, so
    the editable install's finder (which maps zo_plugins to the checkout) never loads."""
    started = time.perf_counter()
    env_dir = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True, timeout=120)
    python = env_dir / "bin" / "python"
    install = _run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index",
         "--quiet", str(wheel)],
        cwd=tmp_path,
        env=dict(os.environ),
    )  # fmt: skip
    assert install.returncode == 0, install.stdout + install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env.update(PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", PATH=f"{env_dir / 'bin'}:{env['PATH']}")
    where = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], tmp_path, env)
    purelib = Path(where.stdout.strip())
    # installed after the wheel, so pip saw no other zo-plugins; lists this environment's
    # site-packages (torch, lightning, ...), whose own .pth files (the editable finder) stay unread
    (purelib / "_zo_test_deps.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()

    probe = (
        "import json, sys, importlib.metadata as md, zo_plugins\n"
        "from zo_plugins.cli.train import RECIPE_DIR, available_recipes, recipe_path\n"
        "dist = md.distribution('zo-plugins')\n"
        "print(json.dumps({'file': zo_plugins.__file__, 'version': zo_plugins.__version__,\n"
        "  'dist_version': dist.version, 'dist_at': str(dist.locate_file('')), 'recipes': available_recipes(),\n"
        "  'quickstart': str(recipe_path('quickstart')), 'recipe_dir': str(RECIPE_DIR), 'path': sys.path,\n"
        "  'editable_finder': [m for m in sys.modules if 'editable' in m]}))\n"
    )
    out = _run([str(python), "-c", probe], workdir, env)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert Path(seen["file"]) == purelib / "zo_plugins" / "__init__.py", seen["file"]
    in_checkout = [p for p in seen["path"] if p == str(ROOT) or p.startswith(str(ROOT / "zo_plugins"))]
    assert not in_checkout, in_checkout
    assert Path(seen["dist_at"]) == purelib
    assert seen["editable_finder"] == [], "the checkout's editable finder must not load"
    from zo_plugins import __version__

    assert seen["version"] == seen["dist_version"] == __version__
    assert Path(seen["quickstart"]) == purelib / "zo_plugins" / "recipes" / "quickstart.yaml"
    assert len(seen["recipes"]) >= 19 and "opt-13b-lora" in seen["recipes"]

    zo_train = str(env_dir / "bin" / "zo-train")
    helped = _run([zo_train, "--help"], workdir, env)
    assert helped.returncode == 0, helped.stderr
    assert "quickstart" in helped.stdout and "fit" in helped.stdout
    assert seen["recipe_dir"] in helped.stdout.replace("\n", ""), "the console script runs the installed copy"

    printed = _run([zo_train, "fit", "--config", "quickstart", "--print_config"], workdir, env)
    assert printed.returncode == 0, printed.stderr
    import yaml

    config = yaml.safe_load(printed.stdout)
    assert config["model"]["model_name_or_path"] == "smollm2-135m"
    assert config["trainer"]["strategy"]["class_path"] == "zo_plugins.lightning.ZOStrategy"

    unknown = _run([zo_train, "fit", "--config", "recipe:no-such-recipe"], workdir, env)
    assert unknown.returncode != 0 and "opt-13b-lora" in unknown.stderr, unknown.stderr

    replay_help = _run([str(env_dir / "bin" / "zo-replay"), "--help"], workdir, env)
    assert replay_help.returncode == 0 and "trajectory" in replay_help.stdout, replay_help.stderr
    assert not list(workdir.iterdir()), "nothing is written into the working directory"
    print(f"installed-wheel checks: {time.perf_counter() - started:.1f}s")
