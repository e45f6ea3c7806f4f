#!/usr/bin/env bash
# One command for a lent GPU (issue 13, item 10): at most 11.5 minutes (one deadline, below), with whatever torch, triton and
# transformers the machine already has (no network, no vLLM or flash-attn needed), from the
# project's files alone. Writes benchmarks/results/gpu_check_<device>/ (logs, JSON) and
# benchmarks/results/kernel_kl_<device>.{json,md,png}:
#   1. the kernel tests with the Triton kernel compiled (no interpreter)
#   2. the bf16 rules of training on the device (scripts/gpu_bf16_check.py)
#   3. the kernel benchmark in bf16 at H = 4096 (against Liger if it is importable), and one attention call
#      over a shared row at T = 9,216 (benchmarks/attention_sharing.py): padded rows vs segments by SDPA,
#      flex_attention and flash-attn varlen (if installed) vs the dense mask, each checked against padded
#   4. the TRL SDFT step benchmark (benchmarks/trl_step.py, whole Qwen3-0.6B depth; TRL's loss and ours in
#      full_logits and topk_logits) if TRL is importable
#   5. two FSDP2 processes sharing the GPU (gloo: NCCL refuses two ranks on one device) train 2 steps of
#      --config tiny in bf16, against one process: the sharded load, generation and saves on CUDA
#   6. if vLLM is importable: 2 steps with the colocated vLLM engine (sleep mode), and with 2 or more GPUs
#      2 processes sharing one tensor-parallel engine (--vllm-tensor-parallel-size 2)
# Without CUDA it stops with one line. Usage: bash scripts/gpu_check.sh  (or make gpu-check)
set -uo pipefail
cd "$(dirname "$0")/.."
py="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if ! "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "gpu_check: no CUDA device here (torch.cuda.is_available() is false for $py); nothing was run" >&2
  exit 1
fi
unset TRITON_INTERPRET
# caopd_kernels is the folder kernels/ under another name: make it importable without installing
shim=$(mktemp -d)
ln -s "$PWD/kernels" "$shim/caopd_kernels"
export PYTHONPATH="$PWD:$shim${PYTHONPATH:+:$PYTHONPATH}"
device=$("$py" -c 'import torch, re; print(re.sub(r"[^A-Za-z0-9]+", "-", torch.cuda.get_device_name(0)).strip("-").lower())')
out="benchmarks/results/gpu_check_$device"
mkdir -p "$out"
status=0
exec 3>&1  # the script's own output, for lines from steps whose output goes to a log
# one deadline for the whole script (a lent GPU has ~15 minutes): each step gets its own limit or what is
# left of 690 s, whichever is less, and a step with under 20 s left is skipped (said, and counted a failure)
deadline=690
limit() {
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then echo 0; else echo $(( $1 < left ? $1 : left )); fi
}
step() {  # step SECONDS NAME COMMAND...: the command under its limit, or skipped past the deadline
  local seconds name
  seconds=$(limit "$1"); name=$2; shift 2
  if [ "$seconds" -eq 0 ]; then
    echo "gpu_check: $name skipped: the script's ${deadline} s are spent" >&3
    status=1
    return 1
  fi
  timeout "$seconds" "$@"
}
echo "gpu_check: $device; logs in $out"
"$py" -c 'import torch, triton, transformers; print(f"torch {torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, cuda {torch.version.cuda}")' | tee "$out/versions.txt"
step 300 "kernel tests" "$py" -m pytest -q -p no:cacheprovider tests/test_kernels_fused_linear_kl.py tests/test_kernel_topk.py tests/test_bf16_training.py \
  > "$out/kernel_tests.log" 2>&1 || status=1
tail -1 "$out/kernel_tests.log"
step 120 "bf16 check" "$py" scripts/gpu_bf16_check.py > "$out/bf16_check.json" 2> "$out/bf16_check.log" || status=1
cat "$out/bf16_check.json"
impls="torch triton gemm_floor topk"
"$py" -c 'import liger_kernel' 2>/dev/null && impls="$impls liger"
step 240 "kernel benchmark" "$py" benchmarks/kernel_kl.py --device cuda --dtype bfloat16 --hidden 4096 --ns 2048 8192 16384 \
  --impls $impls > "$out/kernel_benchmark.log" 2>&1 || status=1
tail -5 "$out/kernel_benchmark.log"
step 180 "attention sharing" "$py" -m benchmarks.attention_sharing > "$out/attention_sharing.log" 2>&1 || status=1
tail -6 "$out/attention_sharing.log"
if "$py" -c 'import trl' 2>/dev/null; then
  step 300 "TRL benchmark" "$py" -m benchmarks.trl_step --layers 28 --batch 8 --completion 512 --steps 2 \
    --variants trl caopd --modes full_logits topk_logits \
    > "$out/trl_benchmark.log" 2>&1 || status=1
  tail -8 "$out/trl_benchmark.log"
else
  echo "gpu_check: trl not importable: the TRL benchmark is skipped (pip install 'trl==1.16.*')"
fi
fsdp="$out/fsdp2"
rm -rf "$fsdp"
step 240 "FSDP2 two processes" "$py" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29533 -m caopd \
  train --config tiny --max-steps 2 --bf16 true --fsdp true --distributed-backend gloo --output-dir "$fsdp/two" \
  > "$fsdp.log" 2>&1 && step 120 "FSDP2 one process" "$py" -m caopd train --config tiny --max-steps 2 --bf16 true \
  --output-dir "$fsdp/one" >> "$fsdp.log" 2>&1 || status=1
"$py" - "$fsdp" <<'EOF' || status=1
import json, sys
from pathlib import Path
runs = {n: [json.loads(l) for l in (Path(sys.argv[1]) / n / "metrics.jsonl").read_text().splitlines()]
        for n in ("one", "two")}
print("gpu_check: FSDP2 losses, 2 processes vs 1:", [r["loss"] for r in runs["two"]], [r["loss"] for r in runs["one"]])
print("gpu_check: memory.json of the 2 processes:", " ".join((Path(sys.argv[1]) / "two" / "memory.json").read_text().split()))
EOF
if "$py" -c 'import vllm' 2>/dev/null; then
  step 300 "vLLM colocated" "$py" -m caopd train --config tiny --max-steps 2 --bf16 true --rollout-engine vllm \
    --output-dir "$out/vllm_colocate" > "$out/vllm_colocate.log" 2>&1 || status=1
  tail -2 "$out/vllm_colocate.log"
  if [ "$("$py" -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then
    step 300 "vLLM tensor-parallel" "$py" -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 --master_port 29534 \
      -m caopd train --config tiny --max-steps 2 --bf16 true --fsdp true --rollout-engine vllm \
      --vllm-tensor-parallel-size 2 --output-dir "$out/vllm_tp2" > "$out/vllm_tp2.log" 2>&1 || status=1
    tail -2 "$out/vllm_tp2.log"
  fi
else
  echo "gpu_check: vllm not importable: the vLLM steps are skipped (pip install vllm==0.32.0)"
fi
rm -rf "$shim"
echo "gpu_check: $([ $status = 0 ] && echo passed || echo FAILED: see $out)"
exit $status
