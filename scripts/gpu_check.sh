#!/usr/bin/env bash
# The first-GPU check (issue 31): make a venv with a CUDA torch (as `make venv` does, plus the CUDA wheel),
# then scripts/gpu_check.py runs the CUDA/Triton tests, the kernel benches, the cost model's GPU constants
# and a whiten vs cospadi timing on a few SmolLM2 layers, and writes one JSON (default gpu_check.json).
#
#   scripts/gpu_check.sh [--skip-install] [--out FILE] [--model DIR] [--budget S] [--only STEP,...] [--plan]
#
# Without a CUDA device it installs nothing, says so, writes a JSON with status "skipped" and exits 0.
# GPU_VENV (default .venv-gpu) and TORCH_CUDA_INDEX (default the cu128 wheels) choose the environment; the
# venv sees the system's site-packages, so a machine with a CUDA torch already installed (and no network)
# reuses it. Feed the JSON to the cost model: LRCOMPRESS_COST_RATES=gpu_check.json lrcompress run ... --dry-run
set -u
cd "$(dirname "$0")/.."
VENV=${GPU_VENV:-.venv-gpu}
CUDA_INDEX=${TORCH_CUDA_INDEX:-https://download.pytorch.org/whl/cu128}
install=1
args=()
for arg in "$@"; do
  case "$arg" in
    --skip-install) install=0 ;;
    *) args+=("$arg") ;;
  esac
done
for arg in "${args[@]}"; do [ "$arg" = "--plan" ] && install=0; done

if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu_check: no nvidia-smi on PATH: no CUDA device here, nothing is installed"
  install=0
fi
if [ "$install" = 1 ]; then
  started=$(date +%s)
  [ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
  PY="$VENV/bin/python"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    TORCH=$(grep '^torch==' constraints.txt | cut -d= -f3)
    "$PY" -m pip install -q "torch==$TORCH" --index-url "$CUDA_INDEX" || echo "gpu_check: CUDA torch install failed"
  fi
  "$PY" -m pip install -q -c constraints.txt -e '.[test,gpu]' \
    || echo "gpu_check: pip install of lrcompress failed; going on with what is installed"
  echo "gpu_check: environment ready in $(( $(date +%s) - started )) s"
else
  PY="$VENV/bin/python"
  [ -x "$PY" ] || PY=$(command -v python3)
fi
exec "$PY" scripts/gpu_check.py "${args[@]}"
