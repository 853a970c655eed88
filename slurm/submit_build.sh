#!/usr/bin/env bash
# Submit a shard build to SLURM: an array of NUM_TASKS build tasks, then one finalize job that runs only
# when every task succeeded (it is cancelled if one fails).
#
#   bash slurm/submit_build.sh SOURCE OUT NUM_TASKS [build-shards args...]
#
# Prints "array job: <id>" and "finalize job: <id>". Extra args go to every `radstream build-shards` task.
# sbatch reads SBATCH_PARTITION, SBATCH_ACCOUNT, SBATCH_TIMELIMIT, SBATCH_QOS, ... from the environment
# itself; this script adds:
#   RADSTREAM_CPUS_PER_TASK  cpus per build task (--cpus-per-task; the task's --workers follows it)
#   RADSTREAM_LOG_DIR        folder for the job output files (default: the current folder)
#   RADSTREAM_VENV, RADSTREAM_WORKDIR  passed to the jobs (see build_shards.sbatch)
set -euo pipefail

if (($# < 3)); then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
    exit 2
fi
num_tasks=$3
[[ $num_tasks =~ ^[1-9][0-9]*$ ]] || { echo "submit_build: NUM_TASKS must be a positive integer, got '$num_tasks'" >&2; exit 2; }
# The jobs may start in another folder: pass absolute paths.
SOURCE=$(realpath -m -- "$1")
OUT=$(realpath -m -- "$2")
export SOURCE OUT
shift 3

here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
log_dir=$(realpath -m -- "${RADSTREAM_LOG_DIR:-.}")
mkdir -p -- "$log_dir"
cpus=()
[[ -n ${RADSTREAM_CPUS_PER_TASK:-} ]] && cpus=(--cpus-per-task="$RADSTREAM_CPUS_PER_TASK")

# --export=ALL: SOURCE, OUT and RADSTREAM_* reach the jobs through the environment, whatever SBATCH_EXPORT says.
array_id=$(sbatch --parsable --export=ALL --array="0-$((num_tasks - 1))" "${cpus[@]}" \
    --output="$log_dir/%x-%A_%a.out" "$here/build_shards.sbatch" "$@")
array_id=${array_id%%;*}    # --parsable prints "id" or "id;cluster"
final_id=$(sbatch --parsable --export=ALL --dependency="afterok:$array_id" --kill-on-invalid-dep=yes \
    --output="$log_dir/%x-%j.out" "$here/finalize_shards.sbatch")
final_id=${final_id%%;*}
echo "array job: $array_id"
echo "finalize job: $final_id"
