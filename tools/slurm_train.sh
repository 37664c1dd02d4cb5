#!/usr/bin/env bash
# Training on a Slurm cluster, one task per GPU:
#   [GPUS=16] [GPUS_PER_NODE=8] bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR [train.py options]
# On CPU nodes, GPUS_PER_NODE=0: no GPUs are asked for, GPUS tasks train
# with gloo (put --ntasks-per-node in SRUN_ARGS to place them).
# Also: CPUS_PER_TASK (5), SRUN_ARGS, PYTHON, MASTER_PORT (default derived
# from the job id).
# Preemption and time limits: submitted as a batch job that may be requeued,
#   sbatch --requeue --signal=B:USR1@120 -p PARTITION [-N, -n ...] tools/slurm_train.sh PARTITION JOB_NAME CONFIG WORK_DIR
# the script passes SIGUSR1 to the tasks, whose PreemptionHook finishes the
# iteration, saves an iteration checkpoint and exits 75; the job then
# requeues itself (scontrol requeue) and, requeued (SLURM_RESTART_COUNT > 0),
# resumes from that checkpoint (--resume). So does a job whose tasks got
# SIGUSR1 themselves (--signal=USR1@120). SIGTERM (scancel, the time limit,
# preemption without warning) is passed on too, so the tasks save, but the
# job is not requeued: a cancelled job stays cancelled (Slurm's own
# PreemptMode=REQUEUE requeues a preempted job).
set -ex
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=$4
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
SRUN_ARGS=${SRUN_ARGS:-""}
PYTHON=${PYTHON:-python}

case "$GPUS_PER_NODE" in
    ''|*[!0-9]*) echo "GPUS_PER_NODE must be a whole number (0 on CPU nodes), got '$GPUS_PER_NODE'" >&2; exit 2 ;;
esac
DEVICE_ARGS=()
if [ "$GPUS_PER_NODE" -gt 0 ]; then
    DEVICE_ARGS=(--gres=gpu:"$GPUS_PER_NODE" --ntasks-per-node="$GPUS_PER_NODE")
fi

# Under sbatch this script runs as a copy in Slurm's spool folder: the
# tools are beside the script the job was submitted with.
TOOLS=$(dirname "$0")
if [ ! -f "$TOOLS/train.py" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
    TOOLS=$(dirname "$(scontrol show job "$SLURM_JOB_ID" | sed -n 's/^ *Command=\([^ ]*\).*/\1/p')")
fi
RESUME_ARGS=()
if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then
    RESUME_ARGS=(--resume)
fi

# srun runs in the background so that this shell can take Slurm's signal
# (bash runs a trap only between commands) and pass it on.
SIGNALLED=''
pass_on() {
    SIGNALLED=$1
    kill -"$1" "$SRUN_PID" 2>/dev/null || true
}
trap 'pass_on USR1' USR1
trap 'pass_on TERM' TERM

# SRUN_ARGS is split into words on purpose (several srun options).
PYTHONPATH="$TOOLS/..":${PYTHONPATH:-} \
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    "${DEVICE_ARGS[@]}" \
    --ntasks="$GPUS" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$PYTHON" -u "$TOOLS/train.py" "$CONFIG" --work-dir="$WORK_DIR" \
    --launcher=slurm "${@:5}" "${RESUME_ARGS[@]}" &
SRUN_PID=$!
set +e
wait "$SRUN_PID"
STATUS=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # a trap ended the wait
    wait "$SRUN_PID"
    STATUS=$?
done
set -e
# 75: the tasks saved and stopped at a signal (PreemptionHook).
if [ -n "${SLURM_JOB_ID:-}" ] && { [ "$SIGNALLED" = USR1 ] \
        || { [ "$STATUS" = 75 ] && [ "$SIGNALLED" != TERM ]; }; }; then
    echo "slurm_train.sh: stopped by a signal (status $STATUS); requeueing job $SLURM_JOB_ID, which resumes from the checkpoint" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$STATUS"
