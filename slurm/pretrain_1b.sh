#!/bin/bash
# The 1B preset on N nodes x G GPUs: edit the #SBATCH defaults below, then
#
#   RUN_DIR=/shared/runs/1b DATA=/shared/data/fineweb sbatch slurm/pretrain_1b.sh [more training flags]
#
# It sets the 1B defaults and runs slurm/pretrain.sh (the generic script: rendezvous, one srun step
# with torchrun or the DeepSpeed launcher per node, USR1 -> save -> requeue -> resume). Flags given
# after the script name override the defaults here (the training program keeps the last value).
# Defaults: 4 nodes x 8 GPUs = 32-way DP (TP=1: 1B fits one H100 with ZeRO-1), 2048-token sequences,
# 32 x 8 x 2048 = 0.5M tokens per step, 50k steps = 26B tokens (~20 tokens per parameter).
#
#SBATCH --job-name=memtrain-1b
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
##SBATCH --partition=YOUR_PARTITION
##SBATCH --account=YOUR_ACCOUNT
# (a line starting with ##SBATCH is ignored: remove one # to use it)
set -uo pipefail

if [ -z "${REPO:-}" ]; then
    cmd=$(scontrol show job -o "${SLURM_JOB_ID:?submit me with sbatch}" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/pretrain.sh" ]; then
        REPO=$(cd "$(dirname "$cmd")/.." && pwd)
    else
        REPO=${SLURM_SUBMIT_DIR:-$PWD}
    fi
fi
export REPO
: "${DATA:?set DATA to a prepared data folder (python -m data_pipeline.prepare), or default}"

exec bash "$REPO/slurm/pretrain.sh" \
    --model 1b --data "$DATA" \
    --seq-len 2048 --micro-batch 8 --grad-accum 1 \
    --tp 1 --cp 1 --zero-stage 1 --precision bf16 \
    --lr 4e-4 --schedule cosine --warmup 2000 --steps 50000 \
    --save-every 1000 --seed 0 \
    "$@"
