#!/usr/bin/env bash
# Testing on a Slurm cluster, one task per GPU:
#   [GPUS=8] [GPUS_PER_NODE=8] bash tools/slurm_test.sh PARTITION JOB_NAME CONFIG CHECKPOINT [test.py options]
# On CPU nodes, GPUS_PER_NODE=0: no GPUs are asked for, GPUS tasks test
# with gloo (put --ntasks-per-node in SRUN_ARGS to place them).
# Also: CPUS_PER_TASK (5), SRUN_ARGS, PYTHON, MASTER_PORT (default derived
# from the job id).
set -ex
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
CHECKPOINT=$4
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

# SRUN_ARGS is split into words on purpose (several srun options).
PYTHONPATH="$(dirname "$0")/..":${PYTHONPATH:-} \
srun -p "$PARTITION" \
    --job-name="$JOB_NAME" \
    "${DEVICE_ARGS[@]}" \
    --ntasks="$GPUS" \
    --cpus-per-task="$CPUS_PER_TASK" \
    --kill-on-bad-exit=1 \
    ${SRUN_ARGS} \
    "$PYTHON" -u "$(dirname "$0")/test.py" "$CONFIG" "$CHECKPOINT" \
    --launcher=slurm "${@:5}"
