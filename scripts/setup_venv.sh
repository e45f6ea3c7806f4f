#!/usr/bin/env bash
# Create .venv on first use and install caopd (editable) with the extras given as $1.
#
# CPU machines: torch is installed first as ${CAOPD_TORCH_SPEC:-torch==2.13.0}, so that pip never
# resolves a multi-GB CUDA build (set CAOPD_TORCH_INDEX, e.g. to PyTorch's CPU wheel index, on a
# machine whose pip does not already find a CPU wheel). GPU machines: a CUDA torch that the system
# Python already has is kept (the venv sees system site-packages); otherwise pip's default build.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
py="${PYTHON:-python3}"
has_cuda_torch() { "$1" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; }

if [ ! -x .venv/bin/python ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && has_cuda_torch "$py"; then
    echo "setup: keeping the system's CUDA torch (venv with system site-packages)"
    "$py" -m venv --system-site-packages .venv
  else
    "$py" -m venv .venv
  fi
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)

if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    "${pip[@]}" install torch
  else
    spec="${CAOPD_TORCH_SPEC:-torch==2.13.0}"
    echo "setup: installing $spec (CPU)"
    "${pip[@]}" install "$spec" ${CAOPD_TORCH_INDEX:+--index-url "$CAOPD_TORCH_INDEX"}
  fi
fi

stamp=".venv/.caopd-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "setup: installing caopd${extras:+[$extras]} into .venv"
  "${pip[@]}" install -e ".${extras:+[$extras]}"
  touch "$stamp"
fi
