#!/usr/bin/env bash
# The small-scale reproduction on a 2-core CPU machine: the base-rate table, then the side-by-side
# comparisons, one job at a time (they each use both cores; two at once only slow each other).
# Every part resumes: measured base rates are skipped and each comparison continues from its
# checkpoints, so start it in the background early in every working session:
#   nohup experiments/run_small_scale.sh > runs/small_scale.log 2>&1 &
# Arguments: the comparison configs to run, in order (default: math_cpu, math_products_cpu, math_rg_cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs
nice -n 5 python benchmarks/base_rates.py --skip-measured --max-new-tokens 128 --tasks \
  rg:basic_arithmetic,rg:family_relationships,rg:knights_knaves,rg:gsm_symbolic,rg:path_star,rg:zebra_puzzles
# CodeI/O without its few ~10k-token programs (beyond the sampler's largest prompt bucket), 8 prompts
# per device batch (64 prompts of ~1.5k tokens at once took 17 GB and were OOM-killed):
nice -n 5 python benchmarks/base_rates.py --skip-measured --max-new-tokens 128 --tasks rg:codeio \
  --max-prompts-per-batch 8 --task-options '{"max_question_chars": 4000}'
# basic_arithmetic at easy settings (two or three 1-2 digit terms, + and -):
# the second small-scale task (experiments/math_rg_cpu.yaml).
nice -n 5 python benchmarks/base_rates.py --skip-measured --max-new-tokens 128 --tasks rg:basic_arithmetic \
  --task-options '{"max_terms": 3, "max_digits": 2, "operators": ["+", "-"], "allow_parentheses": false, "allow_negation": false}'
# products at one digit per factor: the second task with headroom (experiments/math_products_cpu.yaml);
# each split has only 50 distinct problems, hence --n 48.
nice -n 5 python benchmarks/base_rates.py --skip-measured --n 48 --max-new-tokens 128 --tasks rg:products \
  --task-options '{"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}'
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(experiments/math_cpu.yaml experiments/math_products_cpu.yaml experiments/math_rg_cpu.yaml)
for config in "${configs[@]}"; do
  fst-compare --config "$config"
done
