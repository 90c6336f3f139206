#!/usr/bin/env bash
# Build the peer's environment for benchmarks/rl_step.py: google-tunix 0.1.7 (CPU jax) in its own
# virtual environment, by default .venv-tunix/ at the repository root (git-ignored), so its pins
# never touch the project's environment. Idempotent: an existing venv with tunix is kept.
#   bash benchmarks/setup_tunix_venv.sh [VENV_DIR]
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
venv="${1:-$root/.venv-tunix}"
python="${PYTHON:-python3}"
if [ -x "$venv/bin/python" ] && "$venv/bin/python" -c "import tunix" 2>/dev/null; then
  echo "$venv"; exit 0
fi
"$python" -m venv "$venv"
"$venv/bin/python" -m pip install -q --upgrade pip
# gguf + transformers: the peer loads the same bundled SmolLM2 weights and tokenizer.
"$venv/bin/python" -m pip install -q "google-tunix==0.1.7" "jax[cpu]" gguf transformers jinja2
"$venv/bin/python" -c "import tunix, jax; print('tunix ok, jax', jax.__version__)" >&2
echo "$venv"
