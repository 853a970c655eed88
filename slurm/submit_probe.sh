#!/usr/bin/env bash
# Submit the linear-probe grid: an array with one task per (aggregation, label fraction) (probe.sbatch), then a
# report job that runs `radstream report OUT --out OUT/report` once every task has ended (afterany).
#
#   bash slurm/submit_probe.sh EMBEDDINGS OUT [radstream.eval.probe args...]
#
# Prints "array job: <id>" and "report job: <id>". EMBEDDINGS is the zarr store of `radstream.eval.embed`; the probe args
# (--config, key=value) go to every task unchanged. sbatch reads SBATCH_PARTITION, SBATCH_GPUS, ... from the
# environment itself (the report job gets no GPUs); this script adds:
#   RADSTREAM_PROBE_AGGREGATIONS, RADSTREAM_PROBE_FRACTIONS  the grid (see probe.sbatch)
#   RADSTREAM_CPUS_PER_TASK   cores per task (--cpus-per-task)
#   RADSTREAM_DEPENDENCY      a dependency of the array, e.g. afterok:<embedding job> (--dependency)
#   RADSTREAM_LOG_DIR         folder for the job output files (default: the current folder)
#   RADSTREAM_VENV, RADSTREAM_WORKDIR  passed to the jobs
set -euo pipefail

if (($# < 2)); then
    awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0" >&2
    exit 2
fi
here=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")" && pwd)
EMBEDDINGS=$(realpath -m -- "$1")
OUT=$(realpath -m -- "$2")
shift 2
mapfile -t cells < <(bash "$here/probe.sbatch" --print-cells)
((${#cells[@]} > 0)) || { echo "submit_probe: empty grid (RADSTREAM_PROBE_AGGREGATIONS/_FRACTIONS)" >&2; exit 2; }
export EMBEDDINGS OUT

log_dir=$(realpath -m -- "${RADSTREAM_LOG_DIR:-.}")
mkdir -p -- "$log_dir"
opts=(--array="0-$((${#cells[@]} - 1))")
[[ -n ${RADSTREAM_CPUS_PER_TASK:-} ]] && opts+=(--cpus-per-task="$RADSTREAM_CPUS_PER_TASK")
[[ -n ${RADSTREAM_DEPENDENCY:-} ]] && opts+=(--dependency="$RADSTREAM_DEPENDENCY" --kill-on-invalid-dep=yes)

array_id=$(sbatch --parsable --export=ALL "${opts[@]}" --output="$log_dir/%x-%A_%a.out" \
    "$here/probe.sbatch" "$@")
array_id=${array_id%%;*}    # --parsable prints "id" or "id;cluster"
report_id=$(env -u SBATCH_GPUS -u SBATCH_GPUS_PER_NODE -u SBATCH_GPUS_PER_TASK -u SBATCH_GRES \
    sbatch --parsable --export=ALL --dependency="afterany:$array_id" --output="$log_dir/%x-%j.out" \
    "$here/report.sbatch" "$OUT" --out "$OUT/report")
report_id=${report_id%%;*}
echo "array job: $array_id"
echo "report job: $report_id"
