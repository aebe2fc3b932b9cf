#!/usr/bin/env bash
# Issue 14's sweep (docs/benchmarks.md, "Issue 14"): MeZO, FZOO (N = 8 and 4, batched probes),
# HiZOO (alpha 1e-6, 1e-3, 1e-2), Sparse MeZO and forward-grad on the embedded task's three
# trainable sets, 3 seeds, each method at several multiples of the set's base learning rate,
# all in one sitting (so the seconds compare), then each method's step time at one load and
# the goal tables and figures. ~45 minutes on a quiet 2-core CPU; run nothing else meanwhile.
#
#   bash scripts/convergence_issue14.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
R=benchmarks/results
C="python benchmarks/convergence.py --cached --threads 2"
HIZOO_A3='hizoo-a1e-3={"estimator": "hizoo", "optimizer": "hizoo", "hessian_smooth": 0.001}'
FULL="--trainable full --top-blocks 2 --lr 3e-4 --eps 1e-3"
LORA="--trainable lora --top-blocks 2 --lr 2e-2 --eps 1e-2"

# the main job's trainable set (the final norm, 576 parameters): the whole grid
$C --budget 300 --checkpoints 15 --seeds 0 1 2 --lr-sweep 0.3 1 3 10 --tag issue14-quiet \
  --define "$HIZOO_A3" \
  --variants mezo fzoo-batched fzoo-q4-batched hizoo hizoo-a1e-3 hizoo-a0.01 sparse-mezo forward-grad
# every weight of the last two layers (7.1M): the learning rates that bracket each method's best
$C $FULL --budget 160 --checkpoints 8 --seeds 0 1 2 --lr-sweep 1 3 10 30 --tag issue14-quiet \
  --check-full before --variants mezo fzoo-batched fzoo-q4-batched hizoo sparse-mezo \
  --only mezo@1 mezo@3 mezo@10 fzoo-batched@10 fzoo-batched@30 fzoo-q4-batched@10 fzoo-q4-batched@30 \
         hizoo@1 hizoo@3 sparse-mezo@3 sparse-mezo@10
# LoRA on the last two layers (30,720)
$C $LORA --budget 300 --checkpoints 10 --seeds 0 1 2 --lr-sweep 1 1.5 2 3 10 --tag issue14-quiet \
  --check-full none --variants mezo fzoo-batched fzoo-q4-batched hizoo \
  --only mezo@1 mezo@1.5 mezo@2 fzoo-batched@3 fzoo-batched@10 fzoo-q4-batched@3 hizoo@1 hizoo@3
# seconds per step at one load: the methods' steps interleaved round-robin in one process
$C --check-full none --time-steps 30 --tag issue14-quiet --define "$HIZOO_A3" \
  --variants mezo fzoo-batched fzoo-q4-batched hizoo hizoo-a1e-3 sparse-mezo forward-grad
$C $FULL --check-full none --time-steps 5 --tag issue14-quiet \
  --variants mezo fzoo fzoo-batched fzoo-q4-batched hizoo sparse-mezo
$C $LORA --check-full none --time-steps 6 --tag issue14-quiet \
  --variants mezo fzoo fzoo-batched fzoo-q4-batched hizoo
# the goal tables (stdout) and figures (docs/img/convergence-<set>-issue14-goal.png)
for set in final-norm full-top2 lora-top2; do
  python benchmarks/convergence.py --merge-runs "$R/convergence-$set-cached-issue14-quiet.runs.json" \
    --step-times "$R/step-times-$set-cached-issue14-quiet.json" --merged-name "$set-issue14"
done
