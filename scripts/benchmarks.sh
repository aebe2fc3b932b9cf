#!/usr/bin/env bash
# Regenerates the benchmark figures and, on request, the measurements behind them.
#
#   bash scripts/benchmarks.sh            # = plots: redraw every figure of the docs from the JSON
#                                         #   in benchmarks/results/ (under a minute; nothing is run)
#   bash scripts/benchmarks.sh quick      # smoke-run step_cost, scaling and offload on tiny shapes (~10 min
#                                         #   on 2 busy cores),
#                                         #   writing into a temporary folder, not benchmarks/results/
#   bash scripts/benchmarks.sh all        # rerun the measurements the docs quote, then redraw:
#                                         #   hours on a 2-core CPU (times measured there):
#     step_cost.py  --models opt-125m smollm2-135m --repeats 3     not timed end to end
#     scaling.py    --steps 4                                      ~17 min
#     offload.py    --models opt-1.3b --steps 3                    ~77 min (sum of its runs' wall_s)
#     offload.py    --models llama-7b --modes disk ...             ~36 min (build 6.5 min, 2 steps)
#     quantized.py  --part memory                                  not timed end to end
#     convergence.py: the two final-norm grids of docs/benchmarks.md (--cached; ~5 s per
#                   300-pass run, 14 variants x 3 learning rates x 3 seeds each), and issue 14's
#                   sweep on three trainable sets (scripts/convergence_issue14.sh, ~85 min quiet)
#   The GPU benchmark (benchmarks/kernels.py) needs a GPU and is not part of `all`.
#
# Figures go to docs/img/, JSON to benchmarks/results/. The figures embed the machine, date and
# command their JSON records.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
what=${1:-plots}
R=benchmarks/results

plots() {
  python benchmarks/plots.py step-cost "$R/step_cost-vm.json"
  python benchmarks/plots.py offload "$R/offload-vm.json"
  python benchmarks/scaling.py --plot "$R/scaling-vm.json" --png docs/img/scaling.png
  python benchmarks/quantized.py --part plot --host vm
  # convergence.py --report rewrites the JSON it reads (its summary): draw from a copy
  tmp=$(mktemp -d)
  for name in convergence-final-norm-cached-300 convergence-final-norm-cached-1200 convergence-final-norm-cached-issue14-mainjob \
              convergence-full-top2-cached-300 convergence-lora-top2-cached-300; do
    cp "$R/$name.json" "$tmp/"
    python benchmarks/convergence.py --report "$tmp/$name.json" --plot-dir "$tmp" > /dev/null
    cp "$tmp/$name.png" docs/img/
    echo "wrote docs/img/$name.png"
  done
  # issue 14's goal figures, from the sweep's runs (the merged JSON goes to $tmp)
  MERGE_OUT="$tmp" bash scripts/convergence_issue14.sh merge > /dev/null
  echo "wrote docs/img/convergence-{final-norm,full-top2,lora-top2}-issue14-goal.png"
  rm -rf "$tmp"
}

case "$what" in
  plots) plots ;;
  quick)
    tmp=$(mktemp -d)
    python benchmarks/step_cost.py --models opt-125m --modes forward zo --repeats 1 --batch 2 --seq 16 --output "$tmp"
    python benchmarks/scaling.py --size tiny --steps 2 --output "$tmp" --png "$tmp/scaling.png"
    python benchmarks/offload.py --quick --output "$tmp"
    echo "smoke results in $tmp"
    ;;
  all)
    python benchmarks/step_cost.py --models opt-125m smollm2-135m --repeats 3
    python benchmarks/scaling.py --steps 4
    python benchmarks/offload.py --models opt-1.3b --steps 3
    # a model larger than this machine's memory (27 GB of block files: set OFFLOAD_DIR to a disk with room)
    python benchmarks/offload.py --models llama-7b --modes disk --batch 1 --seq 16 --steps 2 --offload-dir "${OFFLOAD_DIR:-/tmp}"
    python benchmarks/quantized.py --part memory
    python benchmarks/convergence.py --cached --budget 300 --checkpoints 15 --seeds 0 1 2 --lr-sweep 0.3 1 3
    python benchmarks/convergence.py --cached --budget 1200 --checkpoints 12 --seeds 0 1 2 --lr-sweep 0.3 1 3
    bash scripts/convergence_issue14.sh   # issue 14's sweep: FZOO, HiZOO, Sparse MeZO vs MeZO on 3 sets (~85 min quiet)
    plots
    ;;
  *) echo "usage: bash scripts/benchmarks.sh [plots|quick|all]" >&2; exit 2 ;;
esac
