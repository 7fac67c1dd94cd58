#!/bin/bash
# Pretrain any model on N nodes x G processes per node under Slurm, with checkpoint-before-the-
# time-limit and automatic requeue + resume. Arguments are flags of the training program:
#
#   RUN_DIR=/shared/runs/tiny sbatch --nodes=2 --gpus-per-node=8 slurm/pretrain.sh --model 125m --steps 20000
#
# Variables (the job inherits the submitting shell's environment):
#   RUN_DIR         run directory on storage every node sees (required; passed as --out). Re-submitting
#                   with the same RUN_DIR resumes, as does the automatic requeue.
#   LAUNCHER        torchrun (default: one torchrun per node) or deepspeed (the DeepSpeed launcher
#                   per node with a generated hostfile, --no_ssh)
#   NPROC_PER_NODE  processes per node (default: the GPUs Slurm gave the node; 1 on a node without GPUs,
#                   e.g. with sbatch --gpus-per-node=0 on a CPU partition)
#   TRAIN_MODULE    python module to launch (default pretrain.train)
#   PYTHON          interpreter (default: REPO/.venv/bin/python if present, else python3)
#   REPO            the checkout (default: found from the submitted script's path, else the submit dir)
#   MASTER_PORT     rendezvous port (default: 20000 + job id mod 20000)
# See docs/cluster.md for the NCCL settings and how to choose TP x CP x DP.
#
#SBATCH --job-name=memtrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@600
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=/tmp/slurm-%x-%j.out
# (--signal: USR1 to this script 10 min before the time limit -> the training program saves and
#  exits 0 -> this script requeues the job; --open-mode=append keeps one log across requeues.
#  The log: RUN_DIR/logs/slurm-JOBNAME-JOBID.out (the script copies its output there); Slurm's own
#  file goes to the batch node's /tmp, not the submit directory, unless you pass --output.)
set -uo pipefail

die() { echo "pretrain.sh: error: $*" >&2; exit 2; }
[ -n "${SLURM_JOB_ID:-}" ] || die "submit me with sbatch (or run inside an allocation)"
[ -n "${RUN_DIR:-}" ] || die "set RUN_DIR to a directory on shared storage (it becomes --out)"

# ---------------------------------------------------------------- where the code is
if [ -z "${REPO:-}" ]; then
    cmd=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
    if [ -n "$cmd" ] && [ -f "$(dirname "$cmd")/../pretrain/__init__.py" ]; then
        REPO=$(cd "$(dirname "$cmd")/.." && pwd)
    else
        REPO=${SLURM_SUBMIT_DIR:-$PWD}
    fi
fi
[ -f "$REPO/pretrain/__init__.py" ] || die "REPO=$REPO is not a checkout of this project (set REPO)"
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON=$REPO/.venv/bin/python; else PYTHON=python3; fi
fi
case "$RUN_DIR" in /*) ;; *) RUN_DIR=${SLURM_SUBMIT_DIR:-$PWD}/$RUN_DIR ;; esac
mkdir -p "$RUN_DIR/logs" || die "cannot create $RUN_DIR/logs"
# Everything from here on also goes to RUN_DIR/logs (appended across requeues: the job id stays).
LOG=$RUN_DIR/logs/slurm-${SLURM_JOB_NAME:-job}-$SLURM_JOB_ID.out
exec > >(tee -a "$LOG") 2>&1
tee_pid=$!
trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT  # let tee write the last lines before the job ends
cd "$REPO" || die "cannot cd to $REPO"

# ---------------------------------------------------------------- rendezvous
LAUNCHER=${LAUNCHER:-torchrun}
TRAIN_MODULE=${TRAIN_MODULE:-pretrain.train}
NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
nproc_from=NPROC_PER_NODE
if [ -z "${NPROC_PER_NODE:-}" ]; then  # one process per GPU; one on a node without GPUs
    gpus=${SLURM_GPUS_ON_NODE:-}
    [ -z "$gpus" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ] && gpus=${SLURM_GPUS_PER_NODE##*:}
    nproc_from="the GPUs per node (SLURM_GPUS_ON_NODE=${SLURM_GPUS_ON_NODE:-} SLURM_GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-})"
    case "$gpus" in ''|0) NPROC_PER_NODE=1 ;; *) NPROC_PER_NODE=$gpus ;; esac
fi
case "$NPROC_PER_NODE" in
    ''|*[!0-9]*|0*) die "processes per node from $nproc_from: '$NPROC_PER_NODE' is not a whole number ≥ 1 (set NPROC_PER_NODE)" ;;
esac
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
[ "${#HOSTS[@]}" -ge 1 ] || die "cannot expand SLURM_JOB_NODELIST=$SLURM_JOB_NODELIST"
if [ -z "${MASTER_ADDR:-}" ]; then
    MASTER_ADDR=${HOSTS[0]}
    if ! getent hosts "$MASTER_ADDR" >/dev/null; then  # unresolvable name: use the node's NodeAddr
        MASTER_ADDR=$(scontrol show node -o "${HOSTS[0]}" | sed -n 's/.* NodeAddr=\([^ ]*\).*/\1/p')
    fi
fi
MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
export MASTER_ADDR MASTER_PORT PYTHON TRAIN_MODULE NPROC_PER_NODE NNODES RUN_DIR
WORLD=$((NNODES * NPROC_PER_NODE))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
echo "pretrain.sh: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on ${HOSTS[*]}: $NNODES node(s) x" \
     "$NPROC_PER_NODE = $WORLD processes, $LAUNCHER, master $MASTER_ADDR:$MASTER_PORT, run $RUN_DIR"

# ---------------------------------------------------------------- the one step: a launcher per node
# The launcher (torchrun / deepspeed) ignores USR1 (`trap '' USR1` is inherited through exec), so
# when the step is signalled only the training processes act on it: they save and exit 0, and the
# launcher then exits 0 as after a normal end. Each node's rank offset comes from SLURM_NODEID.
case "$LAUNCHER" in
torchrun)
    node_cmd='trap "" USR1; exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node-rank="$SLURM_NODEID" \
        --nproc-per-node="$NPROC_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
        -m "$TRAIN_MODULE" "$@"'
    ;;
deepspeed)
    HOSTFILE=$RUN_DIR/hostfile.$SLURM_JOB_ID
    for h in "${HOSTS[@]}"; do echo "$h slots=$NPROC_PER_NODE"; done > "$HOSTFILE"
    export HOSTFILE
    node_cmd='trap "" USR1; exec "$PYTHON" -m deepspeed.launcher.runner --hostfile="$HOSTFILE" --no_ssh \
        --node_rank="$SLURM_NODEID" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        --module "$TRAIN_MODULE" "$@"'
    ;;
*) die "LAUNCHER must be torchrun or deepspeed, got $LAUNCHER" ;;
esac

got_usr1=0
srun_pid=
on_usr1() {
    got_usr1=1
    echo "pretrain.sh: USR1 (time limit near): asking the training processes to save and exit"
    [ -n "$srun_pid" ] && kill -USR1 "$srun_pid" 2>/dev/null  # srun forwards it to every process of the step
}
trap on_usr1 USR1

# `& wait`: bash runs a trap only after the foreground command ends; wait returns at once instead.
srun --nodes="$NNODES" --ntasks-per-node=1 --kill-on-bad-exit=1 --export=ALL \
    bash -c "$node_cmd" node "$@" --out "$RUN_DIR" &
srun_pid=$!
rc=0
while true; do
    wait "$srun_pid"; rc=$?
    kill -0 "$srun_pid" 2>/dev/null || break  # still running: wait was interrupted by the trap
done

if [ "$got_usr1" = 1 ] && [ "$rc" = 0 ]; then
    echo "pretrain.sh: saved; requeueing job $SLURM_JOB_ID (it resumes from $RUN_DIR/checkpoints/latest)"
    scontrol requeue "$SLURM_JOB_ID"
    exit 0
fi
echo "pretrain.sh: training exited with $rc"
exit "$rc"
