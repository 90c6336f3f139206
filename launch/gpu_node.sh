#!/usr/bin/env bash
# Run an fst_jax command on one GPU node (all its GPUs in one process).
#
#   launch/gpu_node.sh train --config experiments/codeio_pod.yaml seed=1
#   INSTALL=1 launch/gpu_node.sh ...   # first `pip install -e '.[gpu]'` (jax with CUDA 12)
#
# Sets GPU defaults that you can override from the environment: XLA may take 90% of GPU memory,
# the latency-hiding scheduler overlaps collectives with compute, and compiled programs are
# cached in JAX_COMPILATION_CACHE_DIR (default ~/.cache/fst_jax/xla) across runs.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: $0 <subcommand> [--config FILE] [key=value ...]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

if [[ "${INSTALL:-0}" == 1 ]]; then
  pip install -e '.[gpu]'
fi
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
export XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=true ${XLA_FLAGS:-}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$HOME/.cache/fst_jax/xla}
exec python -m fst_jax.cli "$@"
