#!/bin/bash
# Distributed shard build on SLURM: one array task per slice of the shard plan, then a dependent merge.
#
# Usage (from the repository root, on the cluster's login node):
#   launch/slurm_shards.sh OUT_DIR NUM_TASKS --protocol a.csv [b.csv ...] --root DATA_ROOT [build options]
# e.g.
#   launch/slurm_shards.sh /scratch/shards/train 32 --protocol protocols/*.csv --root /data \
#       --split train --max-samples-per-shard 2000 --max-shard-mb 1000 --seed 1234 --workers 16
# (--split keeps the rows whose Proportion is that split; one shard set per split). Before sbatch the
# same arguments go through `posttrain shards build --check` (CSVs, split selection, plan).
#
# Each array task runs `posttrain shards build ... --task-index $SLURM_ARRAY_TASK_ID --num-tasks
# $SLURM_ARRAY_TASK_COUNT` and builds a disjoint, contiguous range of shards (the plan depends only on
# the CSVs and the options, so tasks never coordinate). A finished shard is moved into place atomically
# and recorded, so a failed or preempted task is simply re-run (`sbatch --array=K ...` with the same
# arguments) and skips what it finished. After all tasks succeed, the merge job writes index.json and
# rejects.jsonl; re-run it by hand with `posttrain shards merge OUT_DIR` after re-running a task.
# The result is byte-identical to a single-process `posttrain shards build` with the same options.
#
# Environment: SHARDS_CPUS (cpus per task, default 16; pass a matching --workers), SHARDS_TIME
# (default 04:00:00), SHARDS_PARTITION / SHARDS_ACCOUNT (optional), POSTTRAIN_VENV (activated if set).
set -euo pipefail

if [[ $# -lt 3 ]]; then
    sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi
OUT_DIR=$1
NUM_TASKS=$2
shift 2
# Errors before sbatch, not in every array task: the CSVs, the split selection (mixed proportions need
# --split or --mixed-proportions) and the plan, checked here with the same arguments.
( [[ -n "${POSTTRAIN_VENV:-}" ]] && source "$POSTTRAIN_VENV/bin/activate"
  posttrain shards build --check --out "$OUT_DIR" --no-progress "$@" )

mkdir -p "$OUT_DIR/slurm"

SBATCH_COMMON=(--cpus-per-task="${SHARDS_CPUS:-16}" --time="${SHARDS_TIME:-04:00:00}" --requeue)
[[ -n "${SHARDS_PARTITION:-}" ]] && SBATCH_COMMON+=(--partition="$SHARDS_PARTITION")
[[ -n "${SHARDS_ACCOUNT:-}" ]] && SBATCH_COMMON+=(--account="$SHARDS_ACCOUNT")
# --wrap scripts run under /bin/sh, which has `.` but not `source`
ACTIVATE=${POSTTRAIN_VENV:+. "$POSTTRAIN_VENV/bin/activate" &&}

# printf %q keeps every user argument (paths with spaces, globs already expanded) intact in --wrap.
BUILD_ARGS=$(printf ' %q' "$@")
BUILD_JOB=$(sbatch --parsable "${SBATCH_COMMON[@]}" --job-name=shards-build --array="0-$((NUM_TASKS - 1))" \
    --output="$OUT_DIR/slurm/build-%A_%a.log" \
    --wrap="$ACTIVATE OMP_NUM_THREADS=1 posttrain shards build --out $(printf %q "$OUT_DIR") --no-progress \
        $BUILD_ARGS --task-index \$SLURM_ARRAY_TASK_ID --num-tasks \$SLURM_ARRAY_TASK_COUNT")
MERGE_JOB=$(sbatch --parsable --cpus-per-task=1 --time=00:30:00 --job-name=shards-merge \
    --dependency="afterok:$BUILD_JOB" --output="$OUT_DIR/slurm/merge-%j.log" \
    ${SHARDS_PARTITION:+--partition="$SHARDS_PARTITION"} ${SHARDS_ACCOUNT:+--account="$SHARDS_ACCOUNT"} \
    --wrap="$ACTIVATE posttrain shards merge $(printf %q "$OUT_DIR")")
echo "build array job $BUILD_JOB ($NUM_TASKS tasks), merge job $MERGE_JOB; logs in $OUT_DIR/slurm/"
