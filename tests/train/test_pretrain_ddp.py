"""Two processes on the CPU (gloo) under ``accelerate launch``: a signal on one rank stops both at the same step
with a checkpoint; the resumed run ends on the same step on both ranks with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from radstream.train.run_layout import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_pretrain_script.py")
RECIPE = REPO / "configs" / "pretrain" / "debug.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(report: Path, *args: str) -> subprocess.CompletedProcess:
    """accelerate launch of the pretraining script on 2 CPU processes."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(SCRIPT), "--report", str(report), *args]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)


def reports(folder: Path) -> list[dict]:
    return [json.loads((folder / f"rank-{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
def test_two_processes_stop_and_finish_together(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    common = ["--config", str(RECIPE), f"shards={tiny_shards}", f"run_dir={run_dir}", "run.cpu=true",
              "run.grid_images=0", "checkpoint.every_steps=0"]  # fmt: skip

    stopped = launch(tmp_path / "stopped", "--signal-rank", "1", "--signal-step", "2", *common)
    first = reports(tmp_path / "stopped")
    assert [r["reason"] for r in first] == ["signal", "signal"], stopped.stderr[-3000:]
    assert first[0]["step"] == first[1]["step"] == 3  # the step under way when rank 1 got SIGTERM
    assert first[0]["weights"] == first[1]["weights"]
    assert "exitcode  : 124" in stopped.stderr  # the workers' code (torchrun itself exits 1)
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == 3
    latest = latest_checkpoint(run_dir)
    assert latest.name == "step-3"
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= {p.name for p in latest.iterdir()}

    resumed = launch(tmp_path / "resumed", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    last = reports(tmp_path / "resumed")
    assert [r["reason"] for r in last] == ["done", "done"] and [r["world"] for r in last] == [2, 2]
    assert last[0]["step"] == last[1]["step"] == json.loads((run_dir / "summary.json").read_text())["steps"]
    assert last[0]["weights"] == last[1]["weights"]
    assert not (run_dir / "stopped.json").exists()
