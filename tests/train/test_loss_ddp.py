"""Losses normalised by the global count of real samples: two gloo ranks, one holding only padding, give the
same gradient as one process on the same real samples (supervised cross-entropy and the MAE loss)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.train.test_pretrain_ddp import free_port

REPO = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("ddp_loss_script.py")


def run_script(out: Path, processes: int) -> list[dict]:
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                str(processes), "--num_machines", "1", "--mixed_precision", "no", "--main_process_port",
                str(free_port())]  # fmt: skip
    cmd = [*(launcher if processes > 1 else [sys.executable]), str(SCRIPT), str(out)]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads((out / f"rank-{r}.json").read_text()) for r in range(processes)]


@pytest.mark.slow  # two launches of accelerate, about a minute on 2 loaded cores
def test_a_rank_of_padding_does_not_shrink_the_update(tmp_path):
    alone = run_script(tmp_path / "alone", 1)[0]
    ranks = run_script(tmp_path / "ddp", 2)
    for loss in ("supervised", "mae"):
        reference = np.asarray(alone[loss])
        assert np.abs(reference).max() > 0
        for rank in ranks:  # DDP's averaged gradient equals the single process's, on both ranks
            np.testing.assert_allclose(rank[loss], reference, rtol=1e-4, atol=1e-7)
