#!/usr/bin/env bash
# Builds the documentation site into site/ with warnings as errors (mkdocs build --strict).
# Installs what it needs first (scripts/setup.sh: .venv with the dev extra, which holds the
# docs extra: MkDocs, Material, mkdocstrings). `bash scripts/docs.sh serve` serves it on
# http://127.0.0.1:8000 instead, rebuilding on change.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false NO_MKDOCS_2_WARNING=1
python scripts/recipes_page.py --check
if [ "${1:-build}" = serve ]; then
  exec mkdocs serve --strict
fi
mkdocs build --strict "$@"
echo "site built: $(pwd)/site/index.html"
