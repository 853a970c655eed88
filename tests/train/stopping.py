"""Test helper: run a training stage in a real process and stop it with SIGTERM once training is under way."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def sigterm_after_first_step(cmd: list[str], run_dir: Path) -> tuple[int, str]:
    """Start ``cmd`` on the CPU, wait for its first logged step (signal handlers are installed by then), send
    SIGTERM, and return (exit code, the tail of its stderr)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.is_file() and metrics.read_text()) and proc.poll() is None:
            time.sleep(0.2)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return proc.returncode, stderr.decode()[-2000:]
