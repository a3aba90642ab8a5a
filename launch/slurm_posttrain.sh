#!/usr/bin/env bash
# Multi-node post-training on SLURM: one torchrun per node (c10d rendezvous), one process per GPU.
#
#   sbatch launch/slurm_posttrain.sh PRESET [key=value ...]          # from the repository root
#   sbatch --nodes=4 --partition=gpu launch/slurm_posttrain.sh xlsr_2b optim.lr=1e-6
#   NODES=4 PARTITION=gpu bash launch/slurm_posttrain.sh xlsr_2b     # checks the preset, then sbatch
#
# PRESET is configs/posttrain/PRESET.yaml (or a path to a .yaml). Run with bash, the script submits
# itself through sbatch with these optional variables turned into flags: NODES, GPUS_PER_NODE,
# CPUS_PER_TASK, TIME_LIMIT, PARTITION, ACCOUNT, JOB_NAME (default posttrain-PRESET), and SBATCH_ARGS
# (extra flags, split on spaces). Submitted with sbatch directly, pass sbatch flags instead (sbatch
# also reads SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT).
#
# Output: OUTPUT_DIR, default runs/PRESET/JOB_NAME: the same for every requeue of the job (and for a
# later job of the same name), so training resumes from its checkpoints/latest (checkpoint.resume=auto).
# Requeue: SLURM signals the batch shell USR1 some minutes before the time limit; the trap requeues
# the job, which restarts from the last periodic checkpoint. Preemption with requeue behaves alike.
# Logs: logs/JOB_NAME-JOBID.out, appended across requeues.
# Containers (docker/README.md): SRUN_ARGS adds srun flags (pyxis: --container-image=... ), and
# CONTAINER_EXEC prefixes the per-node command (apptainer: "apptainer exec --nv posttrain.sif").
#SBATCH --job-name=posttrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@180
set -euo pipefail

usage() {
    sed -n '2,/^#SBATCH/p' "${BASH_SOURCE[0]}" | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'
}
if [[ $# -lt 1 ]]; then
    usage >&2
    exit 2
fi
if [[ $1 == -h || $1 == --help ]]; then
    usage
    exit 0
fi

# Inside a job this file is SLURM's copy of the script, so the repository is the submit directory.
if [[ -z ${POSTTRAIN_ROOT:-} ]]; then
    if [[ -n ${SLURM_JOB_ID:-} ]]; then
        POSTTRAIN_ROOT=${SLURM_SUBMIT_DIR:-$PWD}
    else
        POSTTRAIN_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    fi
fi
export POSTTRAIN_ROOT
# shellcheck source=launch/common.sh
source "$POSTTRAIN_ROOT/launch/common.sh"

preset=$1
shift
config=$(posttrain_config "$preset")

submit() {
    local flags=("--job-name=${JOB_NAME:-posttrain-$(basename "$preset" .yaml)}" "--chdir=$POSTTRAIN_ROOT")
    [[ -n ${NODES:-} ]] && flags+=("--nodes=$NODES")
    [[ -n ${GPUS_PER_NODE:-} ]] && flags+=("--gpus-per-node=$GPUS_PER_NODE")
    [[ -n ${CPUS_PER_TASK:-} ]] && flags+=("--cpus-per-task=$CPUS_PER_TASK")
    [[ -n ${TIME_LIMIT:-} ]] && flags+=("--time=$TIME_LIMIT")
    [[ -n ${PARTITION:-} ]] && flags+=("--partition=$PARTITION")
    [[ -n ${ACCOUNT:-} ]] && flags+=("--account=$ACCOUNT")
    local extra=()
    read -r -a extra <<< "${SBATCH_ARGS:-}"
    mkdir -p "$POSTTRAIN_ROOT/logs"  # SLURM does not create the log directory
    exec sbatch "${flags[@]}" "${extra[@]}" "$(realpath "${BASH_SOURCE[0]}")" "$config" "$@"
}

requeue() {
    echo "[$(date -Is)] USR1: time limit or preemption ahead, requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
}

run_job() {
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    export MASTER_ADDR=${hosts[0]}
    # a port derived from the job id: stable across requeues, distinct between jobs sharing a node
    export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
    export NNODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    local gpus=${SLURM_GPUS_PER_NODE:-1}
    export GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-${gpus##*:}}}
    local cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
    # torch's intra-op threads per rank: the node's CPUs shared by its ranks
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cpus / GPUS_PER_NODE > 0 ? cpus / GPUS_PER_NODE : 1))}
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a hung collective kills the job
    export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
    export PYTHONUNBUFFERED=1
    # compute nodes usually have no internet: pre-trained weights come from the shared HF cache
    export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}
    export POSTTRAIN_CONFIG=$config
    export POSTTRAIN_TRAIN_CMD=${POSTTRAIN_TRAIN_CMD:-posttrain train}
    local output_dir=${OUTPUT_DIR:-runs/$(basename "$config" .yaml)/$SLURM_JOB_NAME}
    echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS_PER_NODE" \
         "process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, config $config, output $output_dir" >&2

    local srun_extra=() container=()
    read -r -a srun_extra <<< "${SRUN_ARGS:-}"
    read -r -a container <<< "${CONTAINER_EXEC:-}"
    trap requeue USR1
    # srun in the background: bash runs a trap only between commands, and `wait` is interruptible.
    # The step gets the job's CPUs explicitly (srun no longer inherits --cpus-per-task from sbatch).
    # POSTTRAIN_TRAIN_CMD is split on spaces; user overrides come after output_dir, so they win.
    srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 --export=ALL "${srun_extra[@]}" \
        "${container[@]}" bash -c 'exec torchrun --nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" \
            --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" \
            --max-restarts=0 --no-python $POSTTRAIN_TRAIN_CMD --config "$POSTTRAIN_CONFIG" "$@"' \
        posttrain-node "output_dir=$output_dir" "$@" &
    local pid=$! status=0
    wait "$pid" || status=$?
    while kill -0 "$pid" 2>/dev/null; do  # a trap interrupted `wait`: keep waiting for srun itself
        status=0
        wait "$pid" || status=$?
    done
    return "$status"
}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    submit "$@"
else
    run_job "$@"
fi
