#!/usr/bin/env bash
# Multi-node post-training on SLURM: one torchrun per node (c10d rendezvous), one process per GPU.
#
#   NODES=4 PARTITION=gpu launch/slurm_posttrain.sh xlsr_2b [key=value ...]   # checks, then sbatch
#   launch/slurm_posttrain.sh --dry-run xlsr_2b [key=value ...]   # checks, prints what it would submit
#   sbatch --nodes=4 --partition=gpu launch/slurm_posttrain.sh xlsr_2b   # no checks: straight to the queue
#
# PRESET is configs/posttrain/PRESET.yaml (or a path to a .yaml). Run with bash, the script checks the
# run before it queues (exit 2 naming the problem, nothing submitted): the config and overrides load,
# every shard set exists, is indexed and fits its role (the valid set holds both classes), the
# pre-trained backbone is in the Hugging Face cache the offline job reads (HF_HOME), and the venv the
# job activates runs posttrain (`posttrain train --preflight`). It then submits itself through sbatch
# with these optional variables turned into flags: NODES, GPUS_PER_NODE, CPUS_PER_TASK, TIME_LIMIT,
# PARTITION, ACCOUNT, JOB_NAME (default posttrain-PRESET), and SBATCH_ARGS (extra flags, split on
# spaces). --dry-run prints the sbatch command, the #SBATCH defaults and the torchrun command of each
# node instead of submitting. VENV: the virtual environment the job activates (default: .venv in the
# repository if present, else the active one; VENV=none uses PATH as it is).
#
# Output: OUTPUT_DIR, default runs/PRESET/JOB_NAME: the same for every requeue of the job (and for a
# later job of the same name), so training resumes from its checkpoints/latest (checkpoint.resume=auto).
# Requeue: SLURM signals the batch shell USR1 some minutes before the time limit (--signal=B:USR1@N:
# `posttrain plan --preset PRESET` prints the checkpoint size and the N it needs). The trap forwards it
# to every rank; the ranks agree on it at the end of the step, write one collective checkpoint, record
# it in OUTPUT_DIR/stopped.json and exit; only then is the job requeued, and it resumes from that step.
# A preemption announced with USR1 behaves alike (one without warning resumes from the last periodic
# checkpoint). checkpoint.stop_signal=null turns the checkpoint off (the job is then not requeued).
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
dry_run=0
if [[ $1 == --dry-run ]]; then
    dry_run=1
    shift
    [[ $# -ge 1 ]] || { usage >&2; exit 2; }
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
# torchrun on each node (single-quoted: expanded there, from the job's environment)
TORCHRUN_FLAGS='--nnodes="$NNODES" --nproc-per-node="$GPUS_PER_NODE" --rdzv-backend=c10d'
TORCHRUN_FLAGS+=' --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" --max-restarts=0 --no-python'

default_output_dir() {  # runs/PRESET/JOB_NAME: the same for every requeue of a job name
    echo "runs/$(basename "$config" .yaml)/$1"
}

resolve_venv() {
    if [[ -z ${VENV:-} ]]; then
        if [[ -x $POSTTRAIN_ROOT/.venv/bin/python ]]; then
            VENV=$POSTTRAIN_ROOT/.venv
        else
            VENV=${VIRTUAL_ENV:-none}
        fi
    fi
    export VENV
}

fail() {
    echo "launch/slurm_posttrain.sh: error: $*" >&2
    exit 2
}

# Everything that can be known before the queue: the venv, then `posttrain train --preflight` with
# the job's output_dir and overrides, offline as the job will be.
check_before_submit() {
    local output_dir=$1
    shift
    local python=python3
    if [[ $VENV != none ]]; then
        [[ -x $VENV/bin/python && -f $VENV/bin/activate ]] ||
            fail "VENV=$VENV: no virtual environment there (bin/python, bin/activate);" \
                 "create it (README: install) or set VENV"
        python=$VENV/bin/python
    fi
    local location
    local where='import os, posttrain; print(os.path.dirname(os.path.dirname(posttrain.__file__)))'
    location=$("$python" -c "$where" 2>/dev/null) ||
        fail "$python cannot import posttrain: install it there (pip install -e $POSTTRAIN_ROOT) or set VENV"
    echo "venv: ${VENV} (python $python, posttrain from $location)"
    [[ $(realpath "$location") == "$(realpath "$POSTTRAIN_ROOT")" ]] ||
        echo "warning: that venv runs posttrain from $location, not from this checkout ($POSTTRAIN_ROOT)" >&2
    HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} "$python" -m posttrain train --config "$config" --preflight \
        "output_dir=$output_dir" "$@" || exit 2
}

print_plan() {  # OUTPUT_DIR JOB_NAME FLAG_COUNT SBATCH_FLAGS... OVERRIDES...
    local output_dir=$1 job_name=$2 flag_count=$3
    shift 3
    local flags=("${@:1:$flag_count}") args=("${@:$((flag_count + 1))}")
    echo "# the submission (flags override the #SBATCH lines below)"
    echo "sbatch ${flags[*]} $(realpath "${BASH_SOURCE[0]}") $config ${args[*]}"
    echo "# #SBATCH defaults of the script"
    grep '^#SBATCH' "${BASH_SOURCE[0]}"
    local NNODES=${NODES:-$(sed -n 's/^#SBATCH --nodes=//p' "${BASH_SOURCE[0]}")}
    local GPUS_PER_NODE=${GPUS_PER_NODE:-$(sed -n 's/^#SBATCH --gpus-per-node=//p' "${BASH_SOURCE[0]}")}
    local MASTER_ADDR='<first node>' MASTER_PORT='<20000 + job id % 20000>' SLURM_JOB_ID='<job id>'
    echo "# each of the $NNODES node(s) runs (srun, one task per node; HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1}):"
    [[ $VENV != none ]] && echo "source $VENV/bin/activate"
    local torchrun quoted
    torchrun=$(eval "echo torchrun $TORCHRUN_FLAGS")  # the flags as each node expands them
    quoted=$(printf '%q ' "$config" "output_dir=$output_dir" "${args[@]}")
    echo "$torchrun ${POSTTRAIN_TRAIN_CMD:-posttrain train} --config ${quoted% }"
    echo "# logs: logs/$job_name-<job id>.out; checkpoints: $output_dir/checkpoints (a requeue resumes from latest)"
}

submit() {
    local job_name=${JOB_NAME:-posttrain-$(basename "$preset" .yaml)}
    local flags=("--job-name=$job_name" "--chdir=$POSTTRAIN_ROOT")
    [[ -n ${NODES:-} ]] && flags+=("--nodes=$NODES")
    [[ -n ${GPUS_PER_NODE:-} ]] && flags+=("--gpus-per-node=$GPUS_PER_NODE")
    [[ -n ${CPUS_PER_TASK:-} ]] && flags+=("--cpus-per-task=$CPUS_PER_TASK")
    [[ -n ${TIME_LIMIT:-} ]] && flags+=("--time=$TIME_LIMIT")
    [[ -n ${PARTITION:-} ]] && flags+=("--partition=$PARTITION")
    [[ -n ${ACCOUNT:-} ]] && flags+=("--account=$ACCOUNT")
    local extra=()
    read -r -a extra <<< "${SBATCH_ARGS:-}"
    flags+=("${extra[@]}")
    resolve_venv
    local output_dir=${OUTPUT_DIR:-$(default_output_dir "$job_name")}
    if ((dry_run)); then
        print_plan "$output_dir" "$job_name" "${#flags[@]}" "${flags[@]}" "$@"
    fi
    check_before_submit "$output_dir" "$@"
    ((dry_run)) && exit 0
    export OUTPUT_DIR=$output_dir  # the job writes where the checks looked
    mkdir -p "$POSTTRAIN_ROOT/logs"  # SLURM does not create the log directory
    exec sbatch "${flags[@]}" "$(realpath "${BASH_SOURCE[0]}")" "$config" "$@"
}

stop_signalled=0
forward_stop() {  # SLURM's warning reaches this shell only: pass it on to every rank of the job step
    if ((!stop_signalled)); then
        stop_signalled=1
        echo "[$(date -Is)] USR1: time limit or preemption ahead; asking the ranks of job $SLURM_JOB_ID" \
             "for a checkpoint" >&2
        # again every 30 s until the step ends: a rank still starting up has not installed its handler yet
        (while true; do scancel --signal=USR1 "$SLURM_JOB_ID" 2>/dev/null; sleep 30; done) &
        forwarder=$!
    fi
}

requeue_if_stopped() {  # OUTPUT_DIR: requeue only once the ranks announced a complete checkpoint
    local stopped=$1/stopped.json
    if [[ -f $stopped ]]; then
        echo "[$(date -Is)] the ranks stopped with a checkpoint ($(tr -d '\n ' < "$stopped")); requeueing job" \
             "$SLURM_JOB_ID" >&2
        # a controller too busy to answer once must not lose the requeue (and with it the time limit's work)
        local try
        for try in 1 2 3 4 5; do
            scontrol requeue "$SLURM_JOB_ID" && return 0
            echo "[$(date -Is)] scontrol requeue failed (try $try of 5); again in 10 s" >&2
            sleep 10
        done
        return 1
    else
        echo "[$(date -Is)] USR1 came but the run ended without stopping for it: not requeued" >&2
    fi
}

run_job() {
    local hosts
    mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    # the first node's address as SLURM reaches it (NodeAddr): its name need not resolve anywhere else
    # (|| true: under set -e -o pipefail a slurmctld too busy to answer would end the job here, silently)
    MASTER_ADDR=$(scontrol show node "${hosts[0]}" 2>/dev/null | sed -n 's/.*NodeAddr=\([^ ]*\).*/\1/p' || true)
    if [[ -z $MASTER_ADDR ]]; then
        echo "[$(date -Is)] scontrol show node ${hosts[0]} gave no NodeAddr: the rendezvous uses the name" >&2
    fi
    export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
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
    resolve_venv  # as at submission; a job submitted with sbatch directly resolves it here
    if [[ $VENV != none ]]; then
        # shellcheck disable=SC1091
        source "$VENV/bin/activate"
    fi
    local output_dir=${OUTPUT_DIR:-$(default_output_dir "$SLURM_JOB_NAME")}
    echo "[$(date -Is)] job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $NNODES node(s) x $GPUS_PER_NODE" \
         "process(es), rendezvous $MASTER_ADDR:$MASTER_PORT, config $config, output $output_dir" >&2

    local srun_extra=() container=()
    read -r -a srun_extra <<< "${SRUN_ARGS:-}"
    read -r -a container <<< "${CONTAINER_EXEC:-}"
    mkdir -p "$output_dir"
    rm -f "$output_dir/stopped.json"  # a previous stop was this run's resume point
    local pid status=0 forwarder=
    trap forward_stop USR1
    # srun in the background: bash runs a trap only between commands, and `wait` is interruptible.
    # The step gets the job's CPUs explicitly (srun no longer inherits --cpus-per-task from sbatch).
    # torchrun ignores USR1 (the ranks inherit that until they install their handler): its default
    # would kill the node's ranks. POSTTRAIN_TRAIN_CMD is split on spaces; user overrides come after
    # output_dir, so they win.
    srun --nodes="$NNODES" --ntasks-per-node=1 --cpus-per-task="$cpus" --kill-on-bad-exit=1 --export=ALL "${srun_extra[@]}" \
        "${container[@]}" bash -c "trap '' USR1; exec torchrun $TORCHRUN_FLAGS "'$POSTTRAIN_TRAIN_CMD --config "$POSTTRAIN_CONFIG" "$@"' \
        posttrain-node "output_dir=$output_dir" "$@" &
    pid=$!
    # a trap interrupts `wait` (status 138 for USR1), also when srun is exiting at that moment: wait until
    # srun is gone, then ask for its own status, which bash keeps for an exited background job
    while kill -0 "$pid" 2>/dev/null; do
        wait "$pid" || true
    done
    wait "$pid" || status=$?
    if [[ -n $forwarder ]]; then
        # its sleep, then the loop; `|| true`: the loop may not have started a child yet (set -e would end here)
        pkill -P "$forwarder" 2>/dev/null || true
        kill "$forwarder" 2>/dev/null || true
    fi
    if ((stop_signalled && status == 0)); then
        requeue_if_stopped "$output_dir"
    fi
    return "$status"
}

if [[ -z ${SLURM_JOB_ID:-} ]]; then
    submit "$@"
else
    run_job "$@"
fi
