#!/usr/bin/env bash
# Issue 21's GPU measurements as one prepared run for a lent CUDA machine that has torch, triton and numpy
# and no network (about 8 minutes on one H200; a 540 s budget caps the whole run, each step has its own
# limit within it, and a failing step does not stop the others):
#
#   bash bench/gpu_wheels.sh                 # here, with the network: the wheels it lacks into .whl/
#   bash bench/gpu_suite.sh [OUT_DIR]        # there, .whl/ carried along; OUT_DIR: default $OUT, else ./gpu_out
#
# 0. the wheels of .whl/requirements.txt (DeepSpeed built with DS_BUILD_OPS=0, Megatron-Core, torchao,
#    flash-linear-attention, transformers, ...) installed with pip --no-index --no-deps --target
#    OUT_DIR/site and put first on PYTHONPATH (nothing outside OUT_DIR is written; SITE=DIR uses an installed
#    one instead); 1. the machine and the versions imported; 2. Triton kernels against the PyTorch path
#    inside each layer (bench.kernels: output and gradient differences, fwd+bwd times), bf16 and fp32 at
#    2K tokens, bf16 at 8K; 3. 125m training tokens/s and MFU in bf16 through pretrain.train itself
#    (DeepSpeed ZeRO 1, bench.train), then FP8 through torchao (bench.train --precision fp8); 4. DeltaNet,
#    Gated DeltaNet, TTT-Linear and Titans beside flash-linear-attention (bench.layer --impls chunked fla;
#    fla autotunes its kernels on first use), after bench.profile_step's view of one 125m step (device-busy
#    fraction, kernel launches, top operators), then every mixer's fwd+bwd tokens/s in bf16.
# Everything goes to OUT_DIR/gpu_suite.log, JSON rows to OUT_DIR/*.jsonl. GPU_SUITE_TOY=1 runs every step
# at toy size on CPU (Triton under its interpreter; no FP8; limits ×5), which `bash bench/gpu_wheels.sh --check` does.
set -u
cd "$(dirname "$0")/.."
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
py=${PYTHON:-python3}
log="$out/gpu_suite.log"
toy=${GPU_SUITE_TOY:-0}
slow=$([ "$toy" = 1 ] && echo 5 || echo 1)  # the toy run's step limits ×5: a shared CPU, Triton interpreted
deadline=$((SECONDS + ${GPU_SUITE_BUDGET_S:-$((540 * slow))}))

step() {  # step SECONDS JSONL_NAME COMMAND...: runs it within the budget, appends its output to the log, JSON lines to JSONL_NAME
  local limit=$(($1 * slow)) name=$2 left=$((deadline - SECONDS))
  shift 2
  if [ "$left" -lt 15 ]; then
    echo "### skipped (budget spent): $*" | tee -a "$log"
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "### $(date -u +%H:%M:%S) (limit ${limit}s) $*" | tee -a "$log"
  PYTHONUNBUFFERED=1 timeout "$limit" "$@" 2>&1 | tee -a "$log" | { grep '^{' || true; } >> "$out/$name.jsonl"
  echo "### exit ${PIPESTATUS[0]}" | tee -a "$log"
}

if [ -z "${SITE:-}" ] && [ -f .whl/requirements.txt ]; then
  SITE="$out/site"
  if $py -m pip --version > /dev/null 2>&1; then
    step 120 install $py -m pip install --no-index --no-deps --disable-pip-version-check --find-links .whl \
      --target "$SITE" -r .whl/requirements.txt
  else  # no pip there: a wheel unpacked is its package installed
    step 120 install $py -c "import glob, sys, zipfile; [zipfile.ZipFile(w).extractall(sys.argv[1]) for w in glob.glob('.whl/*.whl')]" "$SITE"
  fi
fi
export PYTHONPATH="${SITE:+$SITE:}$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$toy" = 1 ]; then  # CPU, toy sizes: the same commands, small
  export DS_ACCELERATOR=cpu OMP_NUM_THREADS=1
  interp=(env TRITON_INTERPRET=1)  # the Triton kernels on CPU
  kern=(--hidden 32 --heads 2 --chunk 16 --window 16 --seq-len 48 --iters 1)
  kern8k=(--hidden 32 --heads 2 --chunk 16 --window 16 --seq-len 64 --iters 1)
  lay=(--hidden 32 --heads 2 --seq-len 64 --iters 1 --chunk 16 --window 16 --segment 16)
  all_layers=(--layers ttt_linear ttt_mlp titans lact swa)
  train=(--model tiny --seq-len 32 --micro-batch 2 --steps 3 --precision fp32)
  prof=(--model tiny --seq-len 64 --micro-batch 2 --steps 1 --warmup 1)
else
  export DS_ACCELERATOR=cuda  # bench.train would otherwise default DeepSpeed to its CPU accelerator
  interp=(env)
  kern=(--iters 10)
  kern8k=(--seq-len 8192 --iters 5)
  lay=(--iters 10)
  all_layers=()
  train=(--model 125m --seq-len 2048 --micro-batch 8 --steps 12 --precision bf16)
  prof=(--model 125m --seq-len 2048 --micro-batch 8 --dtype bfloat16)
fi

[ "$toy" = 1 ] || step 30 env nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
step 120 env $py -c "
import torch, triton, deepspeed, megatron.core, transformers, fla, importlib.metadata as md
from torchao.float8 import convert_to_float8_training
print(torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')
print({p: md.version(p) for p in ('deepspeed', 'megatron-core', 'torchao', 'flash-linear-attention', 'transformers')})"
step 150 kernels "${interp[@]}" $py -m bench.kernels --dtype bfloat16 "${kern[@]}" --json
step 240 train $py -m bench.train "${train[@]}"
if [ "$toy" = 1 ]; then
  echo "### toy run: FP8 step skipped (needs FP8 tensor cores)" | tee -a "$log"
else
  step 180 train $py -m bench.train "${train[@]/bf16/fp8}" --fp8-backend torchao
fi
step 90 profile $py -m bench.profile_step "${prof[@]}" --docs 200  # the trainer's packed documents, fwd+bwd alone
step 120 layers $py -m bench.layer --layers deltanet gated_deltanet ttt_linear titans --impls chunked fla \
  --dtype bfloat16 "${lay[@]}" --json
step 180 layers $py -m bench.layer "${all_layers[@]}" --dtype bfloat16 "${lay[@]}" --json
step 120 kernels "${interp[@]}" $py -m bench.kernels --dtype float32 "${kern[@]}" --json
step 120 kernels "${interp[@]}" $py -m bench.kernels --layers ttt_linear ttt_mlp titans --dtype bfloat16 "${kern8k[@]}" --json
echo "### done: $out" | tee -a "$log"
