#!/usr/bin/env bash
# The small-scale reproduction on a 2-core CPU machine: the base-rate table, then the side-by-side
# comparisons, one job at a time (they each use both cores; two at once only slow each other).
# Every part resumes: measured base rates are skipped and each comparison continues from its
# checkpoints, so start it in the background early in every working session:
#   nohup experiments/run_small_scale.sh > runs/small_scale.log 2>&1 &
# Arguments: the comparison configs to run, in order (default: experiments/math_cpu.yaml).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
nice -n 5 python benchmarks/base_rates.py --skip-measured --max-new-tokens 128 --tasks \
  rg:basic_arithmetic,rg:family_relationships,rg:knights_knaves,rg:gsm_symbolic,rg:path_star,rg:zebra_puzzles,rg:codeio
for config in "${@:-experiments/math_cpu.yaml}"; do
  fst-compare --config "$config"
done
