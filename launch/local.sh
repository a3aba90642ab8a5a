#!/usr/bin/env bash
# Single-node post-training: torchrun --standalone, one process per GPU (or NPROC CPU processes).
#
#   launch/local.sh PRESET [key=value ...]
#   NPROC=2 launch/local.sh demo train.max_steps=20      # on a machine without GPU: CPU + gloo
#
# PRESET is configs/posttrain/PRESET.yaml (or a path to a .yaml). NPROC defaults to the number of
# visible GPUs, or 1 without any. Without a GPU, DeepSpeed needs its CPU accelerator
# (DS_ACCELERATOR=cpu, set here unless already set) and each process gets an equal share of cores.
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    [[ $# -lt 1 ]] && exit 2
    exit 0
fi

export POSTTRAIN_ROOT=${POSTTRAIN_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
# shellcheck source=launch/common.sh
source "$POSTTRAIN_ROOT/launch/common.sh"
config=$(posttrain_config "$1")
shift

gpus=0
if command -v nvidia-smi >/dev/null 2>&1; then
    gpus=$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)
fi
nproc_per_node=${NPROC:-$((gpus > 0 ? gpus : 1))}
if ((gpus == 0)); then
    export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}
    cores=$(nproc)
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$((cores / nproc_per_node > 0 ? cores / nproc_per_node : 1))}
fi

exec torchrun --standalone --nnodes=1 --nproc-per-node="$nproc_per_node" \
    --no-python ${POSTTRAIN_TRAIN_CMD:-posttrain train} --config "$config" "$@"
