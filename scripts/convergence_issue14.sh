#!/usr/bin/env bash
# Issue 14's sweep (docs/benchmarks.md, "Issue 14"): MeZO, FZOO (N = 8 and 4, batched probes),
# HiZOO (alpha 1e-6, 1e-3, 1e-2), Sparse MeZO and forward-grad on the embedded task's three
# trainable sets, 3 seeds, each method at several multiples of the set's base learning rate,
# all in one sitting (so the seconds compare), then each method's step time at one load and
# the goal tables and figures. ~85 minutes on a quiet 2-core CPU (the sum of its parts as they ran here, 2026-12-01); run nothing else meanwhile.
#
#   bash scripts/convergence_issue14.sh          # the sweep, then the tables and figures
#   bash scripts/convergence_issue14.sh merge    # only the tables and figures, from benchmarks/results
#                                                # (MERGE_OUT=DIR: their JSON into DIR)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = merge ]; then
  . .venv/bin/activate
  R=benchmarks/results
  out=${MERGE_OUT:-$R}
  # cells run again with finer evaluations replace their coarse runs
  drops() { local f=$1; shift; for cell in "$@"; do for seed in 0 1 2; do echo "$f:$cell:$seed"; done; done; }
  F=convergence-full-top2-cached-issue14
  L=convergence-lora-top2-cached-issue14
  python benchmarks/convergence.py --merge-runs "$R/convergence-final-norm-cached-issue14-fine.runs.json" \
    "$R/convergence-final-norm-cached-issue14-fine-edges.runs.json" \
    --step-times "$R/step-times-final-norm-cached-issue14-quiet.json" --merged-name final-norm-issue14 --output "$out"
  python benchmarks/convergence.py --merge-runs "$R/$F-quiet.runs.json" "$R/$F-edges.runs.json" \
    "$R/$F-fine-edges.runs.json" "$R/$F-edges2.runs.json" \
    --drop $(drops "$F-quiet.runs.json" mezo@3) $(drops "$F-edges.runs.json" sparse-mezo@30) \
    --step-times "$R/step-times-full-top2-cached-issue14-quiet.json" --merged-name full-top2-issue14 --output "$out"
  python benchmarks/convergence.py --merge-runs "$R/$L-quiet.runs.json" "$R/$L-fine-mezo.runs.json" \
    "$R/$L-fine-fzoo.runs.json" "$R/$L-edges.runs.json" \
    --drop $(drops "$L-quiet.runs.json" mezo@1 fzoo-batched@3 fzoo-q4-batched@3) \
    --step-times "$R/step-times-lora-top2-cached-issue14-quiet.json" --merged-name lora-top2-issue14 --output "$out"
  exit 0
fi
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false OMP_NUM_THREADS=2
R=benchmarks/results
C="python benchmarks/convergence.py --cached --threads 2"
HIZOO_A3='hizoo-a1e-3={"estimator": "hizoo", "optimizer": "hizoo", "hessian_smooth": 0.001}'
FULL="--trainable full --top-blocks 2 --lr 3e-4 --eps 1e-3"
LORA="--trainable lora --top-blocks 2 --lr 2e-2 --eps 1e-2"

# the main job's trainable set (the final norm, 576 parameters): the whole grid, evaluated every
# 2 passes to 60, every 4 to 160 (the passes to the target, resolved), every 20 to 300
FN_AT="$(seq -s ' ' 2 2 60) $(seq -s ' ' 64 4 160) $(seq -s ' ' 180 20 300)"
$C --budget 300 --eval-at $FN_AT --seeds 0 1 2 --lr-sweep 0.3 1 3 10 --tag issue14-fine \
  --check-full none --define "$HIZOO_A3" \
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
# ... and the cells that decide LoRA's ratios again, evaluated finely where they reach the target
$C $LORA --budget 300 --seeds 0 1 2 --lr-sweep 1 1.5 2 3 10 --tag issue14-fine-mezo --check-full none \
  --eval-at $(seq -s ' ' 30 30 240) $(seq -s ' ' 246 6 300) --variants mezo --only mezo@1
$C $LORA --budget 300 --seeds 0 1 2 --lr-sweep 1 1.5 2 3 10 --tag issue14-fine-fzoo --check-full none \
  --eval-at 30 $(seq -s ' ' 60 5 180) $(seq -s ' ' 210 30 300) \
  --variants fzoo-batched fzoo-q4-batched --only fzoo-batched@3 fzoo-q4-batched@3
# one learning rate beyond each method's range where its fastest holding one was at an edge
$C $FULL --budget 160 --checkpoints 8 --seeds 0 1 2 --lr-sweep 10 30 100 --tag issue14-edges \
  --check-full none --variants fzoo-batched fzoo-q4-batched hizoo sparse-mezo \
  --only fzoo-batched@100 fzoo-q4-batched@100 hizoo@10 sparse-mezo@30
$C $LORA --budget 300 --seeds 0 1 2 --lr-sweep 1.5 10 --tag issue14-edges --check-full none \
  --eval-at 30 $(seq -s ' ' 60 5 180) $(seq -s ' ' 210 30 300) \
  --variants fzoo-q4-batched --only fzoo-q4-batched@1.5 fzoo-q4-batched@10
# ... and beyond again, with the deciding cells evaluated finely
$C --budget 300 --eval-at $FN_AT --seeds 0 1 2 --lr-sweep 5 30 100 --tag issue14-fine-edges \
  --check-full none --define "$HIZOO_A3" \
  --variants mezo fzoo-batched fzoo-q4-batched hizoo hizoo-a1e-3 hizoo-a0.01 sparse-mezo forward-grad \
  --only mezo@5 fzoo-batched@30 fzoo-batched@100 fzoo-q4-batched@30 fzoo-q4-batched@100 hizoo@30 hizoo@100 \
         hizoo-a1e-3@30 hizoo-a1e-3@100 hizoo-a0.01@30 hizoo-a0.01@100 sparse-mezo@30 sparse-mezo@100 \
         forward-grad@30 forward-grad@100
$C $FULL --budget 160 --seeds 0 1 2 --lr-sweep 3 5 30 --eval-at $(seq -s ' ' 5 5 100) 120 140 160 \
  --tag issue14-fine-edges --check-full none --variants mezo sparse-mezo --only mezo@3 mezo@5 sparse-mezo@30
$C $FULL --budget 160 --checkpoints 8 --seeds 0 1 2 --lr-sweep 100 300 --tag issue14-edges2 \
  --check-full none --variants fzoo-batched sparse-mezo --only fzoo-batched@300 sparse-mezo@100
# the main job's own budget and split (500 passes = its 250 MeZO steps, its 500 held-out
# examples), evaluated every 10 passes: MeZO against FZOO N = 4 one probe per forward (what the
# HF Trainer path runs), whether FZOO should become the main job's default (~6 min)
$C --budget 500 --eval-at $(seq -s ' ' 10 10 500) --seeds 0 1 2 --lr 1e-2 --eps 1e-2 --n-eval 500 \
  --lr-sweep 1 3 5 10 30 --tag issue14-mainjob --check-full none --variants mezo fzoo-q4
# seconds per step at one load: the methods' steps interleaved round-robin in one process
$C --check-full none --time-steps 30 --tag issue14-quiet --define "$HIZOO_A3" \
  --variants mezo fzoo-batched fzoo-q4-batched hizoo hizoo-a1e-3 sparse-mezo forward-grad
$C $FULL --check-full none --time-steps 5 --tag issue14-quiet \
  --variants mezo fzoo fzoo-batched fzoo-q4-batched hizoo sparse-mezo
$C $LORA --check-full none --time-steps 6 --tag issue14-quiet \
  --variants mezo fzoo fzoo-batched fzoo-q4-batched hizoo
# the goal tables (stdout) and figures (docs/img/convergence-<set>-issue14-goal.png)
bash scripts/convergence_issue14.sh merge
