#!/bin/bash
# The 1B recipe (configs/runs/1b.yaml) on N nodes x G GPUs: edit the #SBATCH defaults below, then
#
#   RUN_DIR=/shared/runs/1b DATA=/shared/data/fineweb sbatch slurm/pretrain_1b.sh [more training flags]
#
# It runs slurm/pretrain.sh (the generic script: rendezvous, one srun step with torchrun or the
# DeepSpeed launcher per node, USR1 -> save -> requeue -> resume) with --config configs/runs/1b.yaml:
# that file is the recipe (model, batch, schedule, evaluation, checkpoints); this script adds only the
# cluster shape below, DATA (--data; default: the file's) and RUN_DIR (--out). Flags given after the
# script name override the file (the training program keeps the last value).
# The shape: 4 nodes x 8 GPUs = 32-way DP (TP=1: 1B fits one H100 with ZeRO-1); on other hardware
# override it when submitting, e.g. sbatch --nodes=1 --gpus-per-node=0 ... (one process per node
# without GPUs; NPROC_PER_NODE sets the count). The log: RUN_DIR/logs/slurm-memtrain-1b-JOBID.out.
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
#SBATCH --output=/tmp/slurm-%x-%j.out
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
data=()
[ -n "${DATA:-}" ] && data=(--data "$DATA")

exec bash "$REPO/slurm/pretrain.sh" --config "$REPO/configs/runs/1b.yaml" "${data[@]}" "$@"
