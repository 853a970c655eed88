"""Elastic resume of MAE pretraining on the CPU (gloo) under ``accelerate launch``: a run stopped mid-epoch on 2
processes finishes the epoch on 1, and one stopped on 1 finishes on 2; across the stop and the resume every
sample of the epoch is trained exactly once (padded repeats aside), and the next epoch is the plain one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from radstream.shards.manifest import read_samples
from radstream.train.run_layout import latest_checkpoint

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_elastic_script.py")
RECIPE = REPO / "configs" / "pretrain" / "debug.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(processes: int, keys: Path, *args: str) -> subprocess.CompletedProcess:
    """accelerate launch of the logging pretraining script on ``processes`` CPU processes."""
    multi = ["--multi_gpu"] if processes > 1 else []
    cmd = [sys.executable, "-m", "accelerate.commands.launch", *multi, "--num_processes", str(processes),
           "--num_machines", "1", "--mixed_precision", "no", "--main_process_port", str(free_port()),
           str(SCRIPT), "--keys", str(keys), *args]  # fmt: skip
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def trained(keys: Path, epoch: int) -> Counter:
    """Every valid key trained in ``epoch``, all ranks, counted."""
    seen = Counter()
    for path in keys.glob("keys-rank-*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["epoch"] == epoch:
                seen.update(entry["keys"])
    return seen


@pytest.mark.slow
@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)])
def test_stop_mid_epoch_resume_on_another_world_size(tiny_shards, tmp_path, before: int, after: int) -> None:
    run_dir = tmp_path / "run"
    common = ["--config", str(RECIPE), f"shards={tiny_shards}", f"run_dir={run_dir}", "run.cpu=true",
              "run.grid_images=0", "checkpoint.every_steps=0", "loader.batch_size=2"]  # fmt: skip
    stopped = launch(before, tmp_path / "keys", *common, "run.max_steps=3")
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    loop = json.loads((latest_checkpoint(run_dir) / "loop_state.json").read_text())
    assert loop["loop"]["epoch"] == 0 and loop["loop"]["epoch_step"] == 3  # mid-epoch
    assert loop["loader"]["num_processes"] == before

    resumed = launch(after, tmp_path / "keys", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # the LR schedule goes on from the images trained: 3 steps of 2 x before images = step 3 x before / after
    assert f"= step {3 * before // after} of the new LR schedule" in resumed.stderr
    every = Counter(r["key"] for r in read_samples(tiny_shards, "train").to_pylist())
    assert trained(tmp_path / "keys", 0) == every  # each sample of the interrupted epoch once
    assert trained(tmp_path / "keys", 1) == every  # the next epoch: the plain schedule of the new size
    loop = json.loads((latest_checkpoint(run_dir) / "loop_state.json").read_text())
    assert loop["loop"]["epoch"] == 2 and loop["loader"]["num_processes"] == after
    assert loop["loader"]["consumed"] == []
