#!/usr/bin/env bash
# Run one fst_jax command on every host of a Cloud TPU VM slice (v4/v5e/v5p/v6e pods included).
#
#   TPU_NAME=my-slice ZONE=us-central2-b launch/tpu_pod.sh train --config experiments/codeio_pod.yaml seed=1
#
# Every host runs `python -m fst_jax.cli <your arguments>` in REPO_DIR; JAX finds the other hosts
# by itself on TPU (FST_COORDINATOR=auto). The repository must already be at REPO_DIR on every
# host (see launch/README.md). Optional: PROJECT (gcloud project), REPO_DIR (default: fst_jax,
# relative to the remote home), INSTALL=1 (first run `pip install -e '.[tpu]'` on every host).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU VM zone}"
if [[ $# -eq 0 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 <subcommand> [--config FILE] [key=value ...]" >&2
  exit 2
fi

repo_dir=${REPO_DIR:-fst_jax}
install=""
if [[ "${INSTALL:-0}" == 1 ]]; then
  install="pip install -e '.[tpu]' && "
fi
# Quote every argument so that spaces and shell characters reach the CLI unchanged.
remote="cd $(printf '%q' "$repo_dir") && ${install}FST_COORDINATOR=auto python -m fst_jax.cli $(printf '%q ' "$@")"

gcloud_args=(compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" --worker=all "--command=$remote")
if [[ -n "${PROJECT:-}" ]]; then
  gcloud_args+=("--project=$PROJECT")
fi
exec gcloud "${gcloud_args[@]}"
