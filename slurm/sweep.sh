#!/bin/bash
# One task of a scaling-law sweep's job array: runs line SLURM_ARRAY_TASK_ID+1 of SWEEP_DIR/runs.txt
# through slurm/pretrain.sh (same rendezvous, requeue and resume). Submitted by
#   python -m pretrain.sweep submit --sweep SWEEP_DIR [--max-concurrent K] [-- more sbatch options]
# which sets SWEEP_DIR, NPROC_PER_NODE, REPO, --array=<pending runs>%K and --output.
#
#SBATCH --job-name=sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=12:00:00
#SBATCH --signal=B:USR1@300
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/tmp/slurm-%x-%A_%a.out
# (submit passes --output=SWEEP_DIR/logs/...; each run's log is also in its RUN_DIR/logs)
set -uo pipefail
: "${SWEEP_DIR:?set by python -m pretrain.sweep submit}" "${SLURM_ARRAY_TASK_ID:?submit me as a job array}"
REPO=${REPO:-$SLURM_SUBMIT_DIR}
NAME=$(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" "$SWEEP_DIR/runs.txt")
[ -n "$NAME" ] || { echo "sweep.sh: no line $((SLURM_ARRAY_TASK_ID + 1)) in $SWEEP_DIR/runs.txt" >&2; exit 2; }
export REPO RUN_DIR=$SWEEP_DIR/runs/$NAME
exec bash "$REPO/slurm/pretrain.sh" --config "$RUN_DIR/train_config.json"
