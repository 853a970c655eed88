"""Two CPU processes under ``accelerate launch`` (gloo): equal steps on both ranks, the union is the split."""

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

SCRIPT = Path(__file__).with_name("ddp_loader_script.py")
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_processes_take_equal_steps_and_cover_the_split(tiny_shards: Path, tmp_path: Path) -> None:
    outfile = tmp_path / "keys"
    env = {
        **os.environ,
        "CUDA_VISIBLE_DEVICES": "",
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--main_process_port",
        str(free_port()),
        str(SCRIPT),
        str(tiny_shards),
        str(outfile),
    ]
    proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads(Path(f"{outfile}.rank{r}.json").read_text()) for r in range(2)]
    assert [r["world"] for r in ranks] == [2, 2]
    backends = [k for k in ranks[0] if k not in ("rank", "world")]
    assert "torch" in backends
    for backend in backends:
        for split in ("train", "val"):
            runs = [r[backend][split] for r in ranks]
            assert runs[0]["steps"] == runs[1]["steps"] == runs[0]["len"] > 0
            expected = {row["key"] for row in read_samples(tiny_shards, split).to_pylist()}
            keys = Counter(k for run in runs for k in run["keys"])
            assert set(keys) == expected
            valid = [k for run in runs for k, v in zip(run["keys"], run["valid"], strict=True) if v]
            assert sorted(valid) == sorted(expected)  # padded repeats are flagged invalid
        if "dali" in backends:
            for r in ranks:
                assert r["dali"]["train"]["keys"] == r["torch"]["train"]["keys"]
