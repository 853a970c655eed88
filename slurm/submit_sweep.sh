#!/usr/bin/env bash
# Submit a learning-rate sweep: an array with one task per rate (sweep_lr.sbatch), then a report job that runs
# `radstream report SWEEP_DIR --out SWEEP_DIR/report` once every task has ended (afterany: a failed rate does
# not block the report of the others).
#
#   bash slurm/submit_sweep.sh SWEEP_DIR [module args...]
#
# Prints "array job: <id>" and "report job: <id>". The module args (recipe, shards=..., overrides) go to every
# task unchanged; each task adds run_dir=SWEEP_DIR/lr-<rate> and the rate. sbatch reads SBATCH_PARTITION,
# SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_GPUS_PER_NODE, ... from the environment itself (the report job gets
# no GPUs); this script adds:
#   RADSTREAM_LRS             the rates (default: the study's ten, train.sweep.STUDY_LR_GRID)
#   RADSTREAM_MODULE          radstream.train.supervised (default), radstream.train.finetune or radstream.train.pretrain; RADSTREAM_LR_KEY:
#                             the config key
#   RADSTREAM_NODES           nodes per task (--nodes; default 1)
#   RADSTREAM_CPUS_PER_TASK   cores of each node's launcher (--cpus-per-task)
#   RADSTREAM_ARRAY_PARALLEL  at most this many tasks at once (--array=0-9%N)
#   RADSTREAM_LOG_DIR         folder for the job output files (default: the current folder)
#   RADSTREAM_VENV, RADSTREAM_WORKDIR, RADSTREAM_CPU_PROCS, ...  passed to the jobs (see accelerate_job.sh)
set -euo pipefail

if (($# < 1)); then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
    exit 2
fi
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
# The jobs may start in another folder: absolute paths, and the checkout that holds accelerate_job.sh.
SWEEP_DIR=$(realpath -m -- "$1")
RADSTREAM_REPO=$(dirname -- "$here")
shift
mapfile -t lrs < <(bash "$here/sweep_lr.sbatch" --print-lrs)
((${#lrs[@]} > 0)) || { echo "submit_sweep: no learning rates in RADSTREAM_LRS='${RADSTREAM_LRS:-}'" >&2; exit 2; }
RADSTREAM_LRS="${lrs[*]}"    # every task reads the same list, whatever the defaults are when it starts
export SWEEP_DIR RADSTREAM_REPO RADSTREAM_LRS

log_dir=$(realpath -m -- "${RADSTREAM_LOG_DIR:-.}")
mkdir -p -- "$log_dir"
opts=(--array="0-$((${#lrs[@]} - 1))${RADSTREAM_ARRAY_PARALLEL:+%$RADSTREAM_ARRAY_PARALLEL}")
[[ -n ${RADSTREAM_NODES:-} ]] && opts+=(--nodes="$RADSTREAM_NODES")
[[ -n ${RADSTREAM_CPUS_PER_TASK:-} ]] && opts+=(--cpus-per-task="$RADSTREAM_CPUS_PER_TASK")

array_id=$(sbatch --parsable --export=ALL "${opts[@]}" --output="$log_dir/%x-%A_%a.out" \
    "$here/sweep_lr.sbatch" "$@")
array_id=${array_id%%;*}    # --parsable prints "id" or "id;cluster"
report_id=$(env -u SBATCH_GPUS -u SBATCH_GPUS_PER_NODE -u SBATCH_GPUS_PER_TASK -u SBATCH_GRES \
    sbatch --parsable --export=ALL --dependency="afterany:$array_id" --output="$log_dir/%x-%j.out" \
    "$here/report.sbatch" "$SWEEP_DIR" --out "$SWEEP_DIR/report")
report_id=${report_id%%;*}
echo "array job: $array_id"
echo "report job: $report_id"
