#!/usr/bin/env bash
# The GPU measurements of issue 11 as one prepared run, for a lent CUDA machine (about 6-9 minutes on
# one H200; each step has its own time limit, and a failing step does not stop the others):
#
#   bash bench/gpu_suite.sh [OUT_DIR]        # OUT_DIR: default $OUT, else ./gpu_out
#
# 1. the machine;  2. Triton kernels against the PyTorch path inside each layer (bench.kernels:
# differences of outputs and gradients, fwd+bwd step times), fp32 and bf16, bench size and 8K tokens;
# 3. every mixer's fwd+bwd tokens/s (bench.layer, the kernels selected as in training);
# 4. end-to-end training tokens/s and MFU at 125m, bf16 (bench.train), and FP8 through torchao
# where importable. Needs only torch and triton there (and transformers/safetensors for step 4);
# wheels missing on the machine can be installed first with PYTHONPATH pointing at them.
# Everything goes to OUT_DIR/gpu_suite.log, JSON rows to OUT_DIR/*.jsonl.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
log="$out/gpu_suite.log"

step() {  # step SECONDS JSONL_NAME COMMAND...: runs it, appends its output to the log, JSON lines to JSONL_NAME
  local limit=$1 name=$2
  shift 2
  echo "### $(date -u +%H:%M:%S) $*" | tee -a "$log"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee -a "$log" | { grep '^{' || true; } >> "$out/$name.jsonl"
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}

step 30 env nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 60 env $py -c "import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())"
for dtype in float32 bfloat16; do
  step 240 kernels $py -m bench.kernels --dtype "$dtype" --iters 10 --json
done
step 240 kernels $py -m bench.kernels --layers ttt_linear ttt_mlp titans --dtype bfloat16 --seq-len 8192 --iters 5 --json
step 300 layers $py -m bench.layer --dtype bfloat16 --iters 10 --json
step 300 train $py -m bench.train --model 125m --seq-len 2048 --micro-batch 8 --precision bf16 --steps 12
if $py -c "import torchao" 2>/dev/null; then
  step 300 train $py -m bench.train --model 125m --seq-len 2048 --micro-batch 8 --precision fp8 --fp8-backend torchao --steps 12
else
  echo "### torchao not importable: FP8 step skipped" | tee -a "$log"
fi
echo "### done: $out" | tee -a "$log"
