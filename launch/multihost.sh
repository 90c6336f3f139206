#!/usr/bin/env bash
# Run one process of a multi-process fst_jax job (bare GPU nodes, Slurm), or N local processes.
#
# On each host, with the same arguments (process 0's host is the coordinator):
#   FST_COORDINATOR=10.0.0.1:1234 FST_NUM_PROCESSES=2 FST_PROCESS_ID=0 launch/multihost.sh train ...
#   FST_COORDINATOR=10.0.0.1:1234 FST_NUM_PROCESSES=2 FST_PROCESS_ID=1 launch/multihost.sh train ...
# Under Slurm, one task per host; JAX reads the Slurm variables itself:
#   srun --nodes=2 --ntasks-per-node=1 launch/multihost.sh train --config experiments/codeio_pod.yaml
# On one machine, N processes for debugging (CPU devices unless JAX_PLATFORMS says otherwise):
#   LOCAL_PROCESSES=2 launch/multihost.sh train --config experiments/codeio_pod.yaml
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: [FST_COORDINATOR=host:port FST_NUM_PROCESSES=N FST_PROCESS_ID=i] $0 <subcommand> [args]" >&2
  exit 2
fi
cd "$(dirname "$0")/.."

if [[ -n "${LOCAL_PROCESSES:-}" ]]; then
  port=$(python -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
  pids=()
  # JAX handles SIGTERM as a preemption notice and keeps running: follow up with SIGKILL.
  # shellcheck disable=SC2317  # called by the EXIT trap
  stop_all() {
    local pid alive=0
    for pid in "${pids[@]}"; do
      if kill "$pid" 2>/dev/null; then alive=1; fi
    done
    if ((alive)); then
      sleep 5
      for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
    fi
  }
  trap stop_all EXIT
  for ((i = 0; i < LOCAL_PROCESSES; i++)); do
    FST_COORDINATOR="localhost:$port" FST_NUM_PROCESSES="$LOCAL_PROCESSES" FST_PROCESS_ID="$i" \
      python -m fst_jax.cli "$@" &
    pids+=("$!")
  done
  # The first process to fail ends the job; the EXIT trap stops the others.
  for ((i = 0; i < LOCAL_PROCESSES; i++)); do
    wait -n || exit $?
  done
  exit 0
fi

if [[ -z "${FST_COORDINATOR:-}" && -n "${SLURM_JOB_ID:-}" ]]; then
  export FST_COORDINATOR=auto
fi
if [[ "${FST_COORDINATOR:-}" != auto ]]; then
  : "${FST_COORDINATOR:?set FST_COORDINATOR=host:port on the host of process 0, or run under Slurm}"
  : "${FST_NUM_PROCESSES:?set FST_NUM_PROCESSES}"
  : "${FST_PROCESS_ID:?set FST_PROCESS_ID (0 .. FST_NUM_PROCESSES-1)}"
  export FST_NUM_PROCESSES FST_PROCESS_ID
fi
export FST_COORDINATOR
exec python -m fst_jax.cli "$@"
