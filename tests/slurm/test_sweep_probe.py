"""Learning-rate sweep and probe arrays (slurm/submit_sweep.sh, slurm/submit_probe.sh) on a real SLURM cluster.

The first test checks the array and report plumbing with stand-ins for `accelerate` and `radstream`; the others
run a 3-rate supervised sweep of the debug ViT, a 2-rate MAE sweep of the debug MAE, and an embedding job
followed by a reduced probe grid over its embeddings, each ended by the real `radstream report`.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
SUBMIT_SWEEP = REPO / "slurm" / "submit_sweep.sh"
SUBMIT_PROBE = REPO / "slurm" / "submit_probe.sh"

# Stand-ins that record their arguments: accelerate per array task (and fails for $FAKE_FAIL_TASK), radstream
# once with the list of records it found.
FAKE_ACCELERATE = """#!/usr/bin/env bash
set -eu
printf '%s\\n' "$@" > "$FAKE_CALLS/accelerate-$SLURM_ARRAY_TASK_ID.args"
[[ $SLURM_ARRAY_TASK_ID != "${FAKE_FAIL_TASK:-}" ]]
"""
FAKE_RADSTREAM = """#!/usr/bin/env bash
set -eu
ls "$FAKE_CALLS" > "$FAKE_CALLS/seen-by-report.txt"
printf '%s\\n' "$@" > "$FAKE_CALLS/radstream.args"
"""


def job_env(**extra: str) -> dict[str, str]:
    """The test's environment without RADSTREAM_* settings of the caller, the venv for the jobs, ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RADSTREAM_")}
    env["PATH"] = f"{Path(sys.executable).parent}:{env['PATH']}"
    if sys.prefix != sys.base_prefix:
        env["RADSTREAM_VENV"] = sys.prefix
    return {**env, **extra}


def submit(tmp_path: Path, helper: Path, args: list[str], env: dict[str, str], cwd: Path = REPO) -> list[str]:
    """Run a submit helper in ``cwd`` (the jobs' folder); returns [array job id, report job id]."""
    env = {**env, "RADSTREAM_LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        ["bash", str(helper), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    match = re.fullmatch(r"array job: (\d+)\nreport job: (\d+)\n", proc.stdout)
    assert match, f"unexpected output of {helper.name}: {proc.stdout!r}"
    return [match[1], match[2]]


def job_logs(tmp_path: Path) -> str:
    return "\n".join(f"---- {p.name}\n{p.read_text()}" for p in sorted((tmp_path / "logs").glob("*.out")))


def report_rows(out: Path) -> list[dict[str, str]]:
    with open(out / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def require_report_command() -> None:
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "radstream"), "report", "--help"], capture_output=True, timeout=60
    )
    if proc.returncode != 0:
        pytest.skip(
            "`radstream report` is not a command yet (radstream.cli.add_report_parser not in the CLI)"
        )


def test_sweep_runs_one_task_per_rate_then_the_report(slurm_cluster, tmp_path):
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    for name, text in (("accelerate", FAKE_ACCELERATE), ("radstream", FAKE_RADSTREAM)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in job_env().items() if k != "RADSTREAM_VENV"}  # the fakes must come first
    env = {**env, "PATH": f"{bin_dir}:{env['PATH']}", "FAKE_CALLS": str(calls), "FAKE_FAIL_TASK": "1"}
    env = {
        **env,
        "RADSTREAM_MODULE": "radstream.train.pretrain",
        "RADSTREAM_LRS": "1e-4, 3e-4 1e-3",
        "RADSTREAM_CPU_PROCS": "1",
    }
    args = ["--config", "configs/pretrain/debug.yaml", "shards=/data/a b"]
    array, report = submit(tmp_path, SUBMIT_SWEEP, ["sweep", *args], env, cwd=tmp_path)

    states = slurm_cluster.wait([array, report], timeout_s=120)

    # afterany: the report runs although the task of 3e-4 failed.
    expected = {
        f"{array}_0": "COMPLETED",
        f"{array}_1": "FAILED",
        f"{array}_2": "COMPLETED",
        report: "COMPLETED",
    }
    assert states == expected, job_logs(tmp_path)
    sweep = tmp_path / "sweep"  # made absolute for the jobs
    for task, lr in enumerate(["1e-4", "3e-4", "1e-3"]):
        lines = (calls / f"accelerate-{task}.args").read_text().splitlines()
        assert lines[lines.index("-m") :] == [
            "-m", "radstream.train.pretrain", *args, f"optim.lr={lr}", f"run_dir={sweep}/lr-{lr}", "run.cpu=true"
        ]  # fmt: skip
    assert (calls / "radstream.args").read_text().splitlines() == [
        "report",
        str(sweep),
        "--out",
        f"{sweep}/report",
    ]
    seen = (calls / "seen-by-report.txt").read_text().split()
    assert {"accelerate-0.args", "accelerate-1.args", "accelerate-2.args"} <= set(seen)


def test_supervised_sweep_reports_all_rates(slurm_cluster, tmp_path, tiny_shards):
    require_report_command()
    sweep = tmp_path / "sweep"
    rates = ["1e-4", "1e-3", "1e-2"]
    env = job_env(RADSTREAM_LRS=" ".join(rates), RADSTREAM_CPU_PROCS="1")
    args = ["--config", "configs/supervised/debug_vit.yaml", f"shards={tiny_shards}"]
    array, report = submit(tmp_path, SUBMIT_SWEEP, [str(sweep), *args], env)

    states = slurm_cluster.wait([array, report], timeout_s=240)

    assert set(states.values()) == {"COMPLETED"} and len(states) == 4, job_logs(tmp_path)
    results = {lr: json.loads((sweep / f"lr-{lr}" / "results.json").read_text()) for lr in rates}
    assert [r["lr"] for r in results.values()] == [float(lr) for lr in rates]
    (row,) = report_rows(sweep / "report")
    assert (row["model"], row["lrs_searched"], row["seeds"]) == ("vit", "3", "0")
    best = max(rates, key=lambda lr: (results[lr]["val_acc"], -float(lr)))  # ties: the smaller rate
    assert float(row["lr"]) == float(best)
    assert float(row["test_acc_mean"]) == pytest.approx(results[best]["test_acc"], abs=1e-6)


def test_mae_sweep_reports_the_rate_with_the_lowest_validation_loss(slurm_cluster, tmp_path, tiny_shards):
    require_report_command()
    sweep = tmp_path / "sweep"
    rates = ["1e-4", "1e-2"]
    env = job_env(
        RADSTREAM_MODULE="radstream.train.pretrain", RADSTREAM_LRS=" ".join(rates), RADSTREAM_CPU_PROCS="1"
    )
    args = ["--config", "configs/pretrain/debug.yaml", f"shards={tiny_shards}", "run.epochs=1",
            "run.grid_images=0", "run.tensorboard=false"]  # fmt: skip
    array, report = submit(tmp_path, SUBMIT_SWEEP, [str(sweep), *args], env)

    states = slurm_cluster.wait([array, report], timeout_s=240)

    assert set(states.values()) == {"COMPLETED"} and len(states) == 3, job_logs(tmp_path)
    summaries = {lr: json.loads((sweep / f"lr-{lr}" / "summary.json").read_text()) for lr in rates}
    rows = list(csv.DictReader((sweep / "report" / "pretrain.csv").read_text().splitlines()))
    assert [(r["run"], float(r["base_lr"])) for r in rows] == [(f"lr-{lr}", float(lr)) for lr in rates]
    best = min(rates, key=lambda lr: (summaries[lr]["best_val_loss"], float(lr)))  # ties: the smaller rate
    assert [r["chosen"] for r in rows] == ["1" if lr == best else "0" for lr in rates]
    for row, lr in zip(rows, rates, strict=True):
        assert float(row["test_mse"]) == pytest.approx(summaries[lr]["test_mse"])
        assert float(row["best_val_loss"]) == pytest.approx(summaries[lr]["best_val_loss"])
    markdown = (sweep / "report" / "results.md").read_text()
    assert "## MAE pretraining" in markdown and "| Study |" in markdown


def pretrain_tiny(tmp_path: Path, shards: Path) -> Path:
    """A debug MAE trained for 2 steps (one CPU process); returns its run folder."""
    run = tmp_path / "mae"
    recipe = REPO / "configs" / "pretrain" / "debug.yaml"
    cmd = [sys.executable, "-m", "radstream.train.pretrain", "--config", str(recipe), f"shards={shards}", f"run_dir={run}",
           "run.max_steps=2", "run.grid_images=0", "run.tensorboard=false"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run


def test_probe_array_over_a_reduced_grid(slurm_cluster, tmp_path, tiny_shards):
    require_report_command()
    run, embeddings, out = pretrain_tiny(tmp_path, tiny_shards), tmp_path / "emb.zarr", tmp_path / "probe"
    embed_cmd = (f"{sys.executable} -m radstream.eval.embed --checkpoint {run}/checkpoints/latest --shards {tiny_shards} "
                 f"--out {embeddings}")  # fmt: skip
    proc = subprocess.run(["sbatch", "--parsable", f"--output={tmp_path}/logs/embed-%j.out", "--wrap", embed_cmd],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    embed = proc.stdout.strip().split(";")[0]
    env = job_env(RADSTREAM_PROBE_AGGREGATIONS="mean,cls", RADSTREAM_PROBE_FRACTIONS="0.1 1.0")
    env["RADSTREAM_DEPENDENCY"] = f"afterok:{embed}"  # the array waits for the embeddings
    args = [str(embeddings), str(out), "--config", "configs/probe/debug.yaml"]
    array, report = submit(tmp_path, SUBMIT_PROBE, args, env)

    states = slurm_cluster.wait([embed, array, report], timeout_s=240)

    assert set(states.values()) == {"COMPLETED"} and len(states) == 6, job_logs(tmp_path)
    cells = [("mean", "0.1"), ("mean", "1.0"), ("cls", "0.1"), ("cls", "1.0")]
    for agg, fraction in cells:
        heads = json.loads((out / f"{agg}-{fraction}" / "probe_results.json").read_text())["heads"]
        assert {(h["aggregation"], h["fraction"]) for h in heads} == {(agg, float(fraction))}
        assert len(heads) == 3  # the debug recipe's 3 learning rates, 1 seed
    rows = report_rows(out / "report")
    assert sorted((r["model"], float(r["fraction"])) for r in rows) == sorted(
        (f"{kind}_{agg}", float(fraction)) for agg, fraction in cells for kind in ("probe", "knn")
    )  # every cell also writes its kNN evaluation (radstream.eval.knn)
    assert {r["lrs_searched"] for r in rows if r["model"].startswith("probe_")} == {"3"}
