#!/usr/bin/env bash
# Runs one training module on every node of the current SLURM job, one `accelerate launch` per node, and turns
# a requested stop into a requeue. Called by pretrain.sbatch and sweep_lr.sbatch from inside the job:
#
#   bash slurm/accelerate_job.sh RUN_DIR MODULE [module args...]
#
# runs, on each node, `accelerate launch --machine_rank $SLURM_NODEID ... -m MODULE [module args...]
# run_dir=RUN_DIR` (plus run.cpu=true in CPU mode).
#
# Exit/requeue contract: the module exits 0 when the run is finished; on SIGUSR1 or SIGTERM every rank finishes
# its step, writes a checkpoint, leaves RUN_DIR/stopped.json and exits 124. torchrun exits 1 when its workers
# exit 124, so stopped.json (removed here before the launch) is what says "requeue": then this script calls
# `scontrol requeue $SLURM_JOB_ID` and exits 0, and the requeued job resumes from RUN_DIR/checkpoints/latest
# with the same command; unless this shell got SIGTERM too (scancel, time limit, preemption): then the job ends
# as SLURM decided, with exit 124. Any other failure keeps the launchers' exit code.
#
# Signals (measured with proctrack/linuxproc): a step signal (`--signal=USR1@T`, `scancel --signal=USR1 JOB`)
# reaches every process of the step, the launchers included: they ignore USR1 and TERM (set here, kept
# across exec), so only the ranks act on it and torchrun waits for them. A batch-shell signal
# (`--signal=B:USR1@T`, `scancel --batch --signal=USR1 JOB`) reaches only this shell, which forwards USR1 to
# the step. TERM (scancel, time limit, preemption) already reaches the step: this shell keeps waiting for the
# checkpoint (until SLURM's KillWait) and does not requeue.
#
# Environment:
#   RADSTREAM_CPU_PROCS       n CPU processes per node (gloo) and run.cpu=true, instead of one per GPU
#   RADSTREAM_GPUS_PER_NODE   processes per node in GPU mode (default: SLURM_GPUS_ON_NODE)
#   RADSTREAM_MAIN_ADDR       rendezvous host (default: the job's first node)
#   RADSTREAM_MAIN_PORT       rendezvous port (default: 20000 + job id % 20000, so jobs sharing a node differ)
#   RADSTREAM_ACCELERATE_CONFIG  an `accelerate config` file (FSDP, precision, ...) passed as --config_file
set -euo pipefail

die() { echo "accelerate_job: $*" >&2; exit 2; }
log() { echo "accelerate_job: $*"; }

(($# >= 2)) || die "usage: accelerate_job.sh RUN_DIR MODULE [module args...]"
run_dir=$1
module=$2
shift 2
: "${SLURM_JOB_ID:?run inside a SLURM job (sbatch)}"

nodes=${SLURM_NNODES:-1}
module_args=("$@" "run_dir=$run_dir")
if [[ -n ${RADSTREAM_CPU_PROCS:-} ]]; then
    per_node=$RADSTREAM_CPU_PROCS
    module_args+=(run.cpu=true)
    export CUDA_VISIBLE_DEVICES=""
else
    per_node=${RADSTREAM_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
    [[ -n $per_node ]] || die "no GPU count: request GPUs (--gpus-per-node) or set RADSTREAM_GPUS_PER_NODE"
fi
[[ $per_node =~ ^[1-9][0-9]*$ ]] || die "processes per node must be a positive integer, got '$per_node'"
main_addr=${RADSTREAM_MAIN_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}
main_port=${RADSTREAM_MAIN_PORT:-$((20000 + SLURM_JOB_ID % 20000))}

launch=(--num_machines "$nodes" --num_processes "$((nodes * per_node))"
    --main_process_ip "$main_addr" --main_process_port "$main_port")
if [[ -n ${RADSTREAM_ACCELERATE_CONFIG:-} ]]; then
    launch+=(--config_file "$RADSTREAM_ACCELERATE_CONFIG")
else
    # Precision and compile come from the run config (Accelerator's arguments win); saying so here only
    # silences accelerate's warning about missing values.
    launch+=(--mixed_precision no --dynamo_backend no)
    if ((nodes * per_node > 1)); then
        launch+=(--multi_gpu)    # DDP; on the CPU too (gloo)
    fi
fi
# srun does not inherit sbatch's --cpus-per-task since SLURM 22.05: pass it on, or the launcher gets one core.
srun_cpus=()
[[ -n ${SLURM_CPUS_PER_TASK:-} ]] && srun_cpus=(--cpus-per-task="$SLURM_CPUS_PER_TASK")

got_usr1="" got_term=""
on_usr1() {
    got_usr1=1
    log "got SIGUSR1: passing it on to the step"
    scancel --signal=USR1 "$SLURM_JOB_ID" || true    # without --batch: the steps only, not this shell
}
on_term() {
    got_term=1
    log "got SIGTERM: waiting for the step to checkpoint"
}
trap on_usr1 USR1
trap on_term TERM

mkdir -p -- "$run_dir"
rm -f -- "$run_dir/stopped.json"    # only a stop of this launch counts
log "job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}): $module on $nodes node(s) x $per_node process(es)," \
    "main $main_addr:$main_port, run $run_dir"
# The node's launcher ignores USR1/TERM (inherited by torchrun and its workers until train.* installs its own
# handlers); SLURM_NODEID is expanded on each node.
# shellcheck disable=SC2016
srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 "${srun_cpus[@]}" \
    bash -c 'trap "" USR1 TERM; exec accelerate launch --machine_rank "$SLURM_NODEID" "$@"' accelerate-node \
    "${launch[@]}" -m "$module" "${module_args[@]}" &
step_pid=$!
# A trapped signal interrupts `wait`; keep waiting until the step has ended, then read its real status.
while kill -0 "$step_pid" 2>/dev/null; do
    wait "$step_pid" || true
done
status=0
wait "$step_pid" || status=$?

if [[ -f $run_dir/stopped.json && -n $got_term ]]; then
    # SIGTERM to the batch shell: scancel, the time limit or preemption, whose own ending (or requeue) stands.
    log "run stopped by SIGTERM ($(<"$run_dir/stopped.json")), checkpoint written: not requeued"
    exit 124
elif [[ -f $run_dir/stopped.json ]]; then
    log "run stopped (${got_usr1:+SIGUSR1 here; }$(<"$run_dir/stopped.json")): requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    log "scontrol requeue failed (job cancelled, or not requeueable: sbatch --requeue); resubmit to resume"
    exit 124
fi
log "$module exited with status $status"
exit "$status"
