#!/usr/bin/env bash
# Sets up the environment and runs the main job: a ZO fine-tune of SmolLM2-135M on
# Rotten Tomatoes with the stock HF Trainer + ZOCallback (about 15 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python examples/rotten_tomatoes.py "$@"
