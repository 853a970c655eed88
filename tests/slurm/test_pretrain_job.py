"""Multi-node pretraining as a SLURM job (slurm/pretrain.sbatch → slurm/accelerate_job.sh) on a real cluster.

The first test checks the launch mapping with a stand-in `accelerate` on PATH; the others run the debug recipe
on 1-2 CPU processes: a job stopped twice (once by a step signal, once by a batch-shell signal) requeues
itself and ends exactly as an uninterrupted job, and a failing run is not requeued.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
PRETRAIN = REPO / "slurm" / "pretrain.sbatch"
RECIPE = REPO / "configs" / "pretrain" / "debug.yaml"
EPOCHS = 50
"""Epochs of the resume test (4 steps each on 2 processes): long enough to stop it twice mid-run."""

# Records its arguments, node id and ignored-signal mask in $FAKE_CALLS/accelerate-<job>.txt.
FAKE_ACCELERATE = """#!/usr/bin/env bash
set -eu
{
    grep '^SigIgn' /proc/$$/status
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"
    printf '%s\\n' "$@"
} > "$FAKE_CALLS/accelerate-$SLURM_JOB_ID.txt"
"""
USR1_BIT, TERM_BIT = 1 << 9, 1 << 14
"""Bits of SIGUSR1 (10) and SIGTERM (15) in /proc/<pid>/status SigIgn."""


def job_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without RADSTREAM_* settings of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if sys.prefix != sys.base_prefix:
        env["RADSTREAM_VENV"] = sys.prefix
    return {**env, "RADSTREAM_REPO": str(REPO), **extra}


def sbatch(tmp_path: Path, script: Path, args: list[str], env: dict[str, str], *opts: str) -> str:
    """Submit ``script`` from the checkout; returns the job id. Output goes to tmp_path/logs/<name>-<id>.out."""
    (tmp_path / "logs").mkdir(exist_ok=True)
    cmd = ["sbatch", "--parsable", "--export=ALL", f"--output={tmp_path / 'logs' / '%x-%j.out'}", *opts]
    proc = subprocess.run(
        [*cmd, str(script), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def job_log(tmp_path: Path, job_id: str) -> str:
    return "".join(p.read_text() for p in (tmp_path / "logs").glob(f"*-{job_id}.out"))


def job_field(job_id: str, name: str) -> str:
    """One field of `scontrol show job`, e.g. Restarts or BatchHost."""
    proc = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30)
    return re.search(rf"\b{name}=(\S+)", proc.stdout)[1]


def restarts(job_id: str) -> int:
    return int(job_field(job_id, "Restarts"))


def train_losses(run_dir: Path) -> dict[int, float]:
    """step → training loss of every complete train line in metrics.jsonl (fails on a step logged twice)."""
    losses: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            row = json.loads(line)
        except ValueError:  # the line being written
            continue
        if row["split"] == "train":
            assert row["step"] not in losses, f"step {row['step']} logged twice"
            losses[row["step"]] = row["loss"]
    return losses


def wait_until(condition, what: str, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.2)


def test_launch_arguments_per_mode(slurm_cluster, tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    (bin_dir / "accelerate").write_text(FAKE_ACCELERATE)
    (bin_dir / "accelerate").chmod(0o755)
    env = {k: v for k, v in job_env(tmp_path).items() if k != "RADSTREAM_VENV"}  # the fake must come first
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_CALLS": str(calls)}
    args = ["--config", "configs/pretrain/debug.yaml", "shards=/data/x y"]
    cpu_env = {**env, "RUN_DIR": "runs/cpu", "RADSTREAM_CPU_PROCS": "2", "RADSTREAM_WORKDIR": str(tmp_path)}
    cpu = sbatch(tmp_path, PRETRAIN, args, cpu_env)
    gpu_env = {**env, "RUN_DIR": str(tmp_path / "gpu"), "RADSTREAM_GPUS_PER_NODE": "4"}
    gpu = sbatch(tmp_path, PRETRAIN, args, {**gpu_env, "RADSTREAM_MAIN_PORT": "23456"})
    no_gpus = sbatch(tmp_path, PRETRAIN, args, {**env, "RUN_DIR": str(tmp_path / "none")})

    states = slurm_cluster.wait([cpu, gpu, no_gpus], timeout_s=120)

    assert states == {cpu: "COMPLETED", gpu: "COMPLETED", no_gpus: "FAILED"}, job_log(tmp_path, no_gpus)
    assert "no GPU count: request GPUs" in job_log(tmp_path, no_gpus)
    host = job_field(cpu, "BatchHost")  # one node: the first of the job's nodes
    common = ["--num_machines", "1", "--main_process_ip", host, "--main_process_port"]
    precision = ["--mixed_precision", "no", "--dynamo_backend", "no"]
    lines = (calls / f"accelerate-{cpu}.txt").read_text().splitlines()
    # The launcher ignores USR1 and TERM, so that a step signal reaches the ranks without killing torchrun.
    ignored = int(lines[0].split()[1], 16)
    assert ignored & USR1_BIT and ignored & TERM_BIT, lines[0]
    assert lines[1] == "CUDA_VISIBLE_DEVICES="
    # A relative RUN_DIR is relative to the job's folder (RADSTREAM_WORKDIR), as the recipe path.
    assert (tmp_path / "runs" / "cpu").is_dir()
    assert lines[2:] == ["launch", "--machine_rank", "0", *common[:2], "--num_processes", "2", *common[2:],
                         str(20000 + int(cpu) % 20000), *precision, "--multi_gpu", "-m", "radstream.train.pretrain", *args,
                         "run_dir=runs/cpu", "run.cpu=true"]  # fmt: skip
    lines = (calls / f"accelerate-{gpu}.txt").read_text().splitlines()
    assert lines[1] == "CUDA_VISIBLE_DEVICES=unset"
    assert lines[2:] == ["launch", "--machine_rank", "0", *common[:2], "--num_processes", "4", *common[2:],
                         "23456", *precision, "--multi_gpu", "-m", "radstream.train.pretrain", *args,
                         f"run_dir={tmp_path / 'gpu'}"]  # fmt: skip
    assert restarts(cpu) == restarts(gpu) == 0


def test_stopped_job_requeues_and_ends_like_an_uninterrupted_one(slurm_cluster, tmp_path, tiny_shards):
    args = ["--config", str(RECIPE), f"shards={tiny_shards}", f"run.epochs={EPOCHS}", "run.patience=0",
            "checkpoint.every_steps=1", "run.grid_images=0", "run.tensorboard=false"]  # fmt: skip
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    job = sbatch(tmp_path, PRETRAIN, args, job_env(tmp_path, RUN_DIR=str(run_dir), RADSTREAM_CPU_PROCS="2"))
    ref = sbatch(tmp_path, PRETRAIN, args, job_env(tmp_path, RUN_DIR=str(ref_dir), RADSTREAM_CPU_PROCS="2"))

    # What `--signal=USR1@T` does at the time limit: every process of the step gets SIGUSR1.
    wait_until(lambda: max(train_losses(run_dir), default=0) >= 6, "step 6 of the first run")
    subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=30)
    stop_pattern = r"accelerate_job: run stopped \(.*\"step\": (\d+).*\): requeueing job"
    wait_until(lambda: len(re.findall(stop_pattern, job_log(tmp_path, job))) == 1, "the first requeue")
    first_stop = int(re.findall(stop_pattern, job_log(tmp_path, job))[0])
    # What `--signal=B:USR1@T` does: only the batch shell gets it; accelerate_job.sh passes it on to the step.
    wait_until(lambda: max(train_losses(run_dir)) >= first_stop + 3, "progress after the first resume")
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True, timeout=30)

    states = slurm_cluster.wait([job, ref], timeout_s=240)

    log = job_log(tmp_path, job)
    assert states == {job: "COMPLETED", ref: "COMPLETED"}, log[-5000:]
    assert restarts(job) == 2 and restarts(ref) == 0
    stops = [int(s) for s in re.findall(stop_pattern, log)]
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, ref_dir))
    assert summary["stopped"] == ref_summary["stopped"] == "done"
    total = ref_summary["steps"]
    assert 6 <= stops[0] < stops[1] < total, stops
    assert [f"(restart {i})" in log for i in range(3)] == [True] * 3
    # Both ranks got the step signal themselves both times; the shell only saw the batch signal.
    assert log.count("(signal 10 here), checkpoint written") == 4
    assert log.count("accelerate_job: got SIGUSR1") == 1
    # The launchers ignored the step signal: torchrun saw its ranks exit 124 instead of dying by SIGUSR1.
    assert "User defined signal" not in log and "exitcode  : 124" in log
    assert summary["steps"] == total
    # Resumed exactly: the same loss at every step (each logged once) and the same test MSE.
    losses, ref_losses = train_losses(run_dir), train_losses(ref_dir)
    assert sorted(losses) == list(range(1, total + 1))
    assert losses == ref_losses
    assert summary["test_mse"] == ref_summary["test_mse"]
    assert not (run_dir / "stopped.json").exists()


def test_failed_run_is_not_requeued(slurm_cluster, tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "stopped.json").write_text('{"step": 3}')  # left by an earlier stop: must not count now
    args = ["--config", str(RECIPE), f"shards={tiny_shards}", "run.no_such_key=1"]
    job = sbatch(tmp_path, PRETRAIN, args, job_env(tmp_path, RUN_DIR=str(run_dir), RADSTREAM_CPU_PROCS="1"))

    states = slurm_cluster.wait([job], timeout_s=120)

    log = job_log(tmp_path, job)
    assert states == {job: "FAILED"}, log
    assert restarts(job) == 0
    assert "bad config" in log and "radstream.train.pretrain exited with status 1" in log
    assert not (run_dir / "stopped.json").exists()


def test_cancelled_job_checkpoints_and_is_not_requeued(slurm_cluster, tmp_path, tiny_shards):
    args = ["--config", str(RECIPE), f"shards={tiny_shards}", "run.epochs=1000", "run.patience=0",
            "checkpoint.every_steps=0", "run.grid_images=0", "run.tensorboard=false"]  # fmt: skip
    run_dir = tmp_path / "run"
    job = sbatch(tmp_path, PRETRAIN, args, job_env(tmp_path, RUN_DIR=str(run_dir), RADSTREAM_CPU_PROCS="1"))
    wait_until(lambda: max(train_losses(run_dir), default=0) >= 3, "step 3")

    subprocess.run(["scancel", job], check=True, timeout=30)  # SIGTERM to every process of the job
    states = slurm_cluster.wait([job], timeout_s=120)

    log = job_log(tmp_path, job)
    assert states == {job: "CANCELLED"} and restarts(job) == 0, log
    stop = json.loads((run_dir / "stopped.json").read_text())["step"]
    assert f"stopped at step {stop} (signal 15 here), checkpoint written" in log
    assert "accelerate_job: got SIGTERM" in log and "not requeued" in log
    assert (run_dir / "checkpoints" / "latest").read_text().strip().endswith(f"step-{stop}")


def test_a_run_resumes_mid_epoch_on_another_number_of_processes(slurm_cluster, tmp_path, tiny_shards):
    """The job's script takes a checkpoint of another world size (a resubmission on other nodes): 2 processes
    stop mid-epoch, 1 process finishes the run through the elastic path."""
    args = ["--config", str(RECIPE), f"shards={tiny_shards}", "run.epochs=2", "loader.batch_size=2",
            "checkpoint.every_steps=0", "run.grid_images=0", "run.tensorboard=false"]  # fmt: skip
    run_dir = tmp_path / "run"
    first = sbatch(tmp_path, PRETRAIN, [*args, "run.max_steps=3"],
                   job_env(tmp_path, RUN_DIR=str(run_dir), RADSTREAM_CPU_PROCS="2"))  # fmt: skip
    assert slurm_cluster.wait([first], timeout_s=240) == {first: "COMPLETED"}, job_log(tmp_path, first)[
        -3000:
    ]
    second = sbatch(
        tmp_path, PRETRAIN, args, job_env(tmp_path, RUN_DIR=str(run_dir), RADSTREAM_CPU_PROCS="1")
    )

    states = slurm_cluster.wait([second], timeout_s=240)

    log = job_log(tmp_path, second)
    assert states == {second: "COMPLETED"}, log[-5000:]
    assert "elastic resume: 2 -> 1 processes" in log
    assert json.loads((run_dir / "summary.json").read_text())["stopped"] == "done"
    loop = json.loads(
        (run_dir / "checkpoints" / "latest")
        .parent.joinpath((run_dir / "checkpoints" / "latest").read_text().strip(), "loop_state.json")
        .read_text()
    )
    assert loop["loop"]["epoch"] == 2 and loop["loader"]["num_processes"] == 1
