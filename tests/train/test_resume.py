"""Exact resume: a run stopped at step k and restarted gives the same losses as one that never stopped;
checkpoints are never half written; SIGTERM ends a real process with code 124 and a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator

import radstream.train.pretrain as pretrain
from radstream.core.config import load_config
from radstream.train.checkpoint import load_checkpoint, save_checkpoint
from radstream.train.config import PretrainConfig
from radstream.train.run_layout import LATEST, latest_checkpoint, list_checkpoints
from tests.accelerate_state import reset_accelerate
from tests.train.stopping import sigterm_after_first_step

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "configs" / "pretrain" / "debug.yaml"


def debug_config(shards: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_config(PretrainConfig, RECIPE, [f"shards={shards}", f"run_dir={run_dir}", *overrides])


def losses(run_dir: Path, split: str = "train") -> dict[int, float]:
    """Loss per step (the last line wins where a resumed run logged a step again)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row["loss"] for row in rows if row["split"] == split}


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it between runs as accelerate's own test case does."""
    yield
    reset_accelerate()


@pytest.fixture(scope="module")
def reference(tiny_shards, tmp_path_factory) -> Path:
    """An uninterrupted 2-epoch debug run with 2 accumulated batches per step."""
    run_dir = tmp_path_factory.mktemp("reference")
    assert pretrain.run(debug_config(tiny_shards, run_dir, *COMMON)) == 0
    reset_accelerate()
    return run_dir


# 2 accumulated micro-batches per step, so the resumed loader and accumulation counter are both exercised
COMMON = ("optim.grad_accum_steps=2", "run.grid_images=0", "checkpoint.every_steps=0")


def test_resume_from_max_steps_matches_uninterrupted(tiny_shards, tmp_path, reference):
    ref = losses(reference)
    steps_per_epoch = max(ref) // 2
    k = steps_per_epoch + 1  # mid-epoch, after an epoch end (validation, early stopping state, loader epoch)
    run_dir = tmp_path / "run"
    assert pretrain.run(debug_config(tiny_shards, run_dir, *COMMON, f"run.max_steps={k}")) == 0
    assert latest_checkpoint(run_dir).name == f"step-{k}"
    assert pretrain.run(debug_config(tiny_shards, run_dir, *COMMON)) == 0  # same command, no flag change
    got = losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert got[step] == pytest.approx(ref[step], abs=1e-6), f"step {step}"
    assert losses(run_dir, "val") == pytest.approx(losses(reference, "val"), abs=1e-6)
    summary, ref_summary = (json.loads((d / "summary.json").read_text()) for d in (run_dir, reference))
    assert summary["test_mse"] == pytest.approx(ref_summary["test_mse"], abs=1e-6)


def test_resume_after_signal_matches_uninterrupted(tiny_shards, tmp_path, reference, monkeypatch):
    """SIGTERM during step 3 (in-process): the step finishes, a checkpoint is written, exit 124; resuming
    continues exactly."""
    train_step = pretrain.train_step

    def signalling_step(*args, **kwargs):
        if kwargs["step"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(pretrain, "train_step", signalling_step)
    assert pretrain.run(debug_config(tiny_shards, run_dir, *COMMON)) == 124
    assert latest_checkpoint(run_dir).name == "step-3"
    assert not (run_dir / "summary.json").exists()
    monkeypatch.setattr(pretrain, "train_step", train_step)
    reset_accelerate()
    assert pretrain.run(debug_config(tiny_shards, run_dir, *COMMON)) == 0
    ref, got = losses(reference), losses(run_dir)
    assert sorted(got) == sorted(ref)
    assert all(got[s] == pytest.approx(ref[s], abs=1e-6) for s in ref)


def test_sigterm_exits_124_with_checkpoint(tiny_shards, tmp_path):
    """A real process: SIGTERM once training is under way -> exit code 124 and a complete checkpoint."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "radstream.train.pretrain", "--config", str(RECIPE), f"shards={tiny_shards}",
           f"run_dir={run_dir}", "run.epochs=200", "run.grid_images=0", "checkpoint.every_steps=0"]  # fmt: skip
    code, stderr = sigterm_after_first_step(cmd, run_dir)
    assert code == 124, stderr
    latest = latest_checkpoint(run_dir)
    assert latest is not None
    saved = json.loads((latest / "loop_state.json").read_text())
    assert saved["step"] == saved["loop"]["step"] >= 1
    assert max(losses(run_dir)) == saved["step"]  # the step under way finished and was saved


# --------------------------------------------------------------------------------- atomic checkpoints


def tiny_accelerator() -> tuple[Accelerator, torch.nn.Module]:
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, _ = accelerator.prepare(model, optimizer)
    return accelerator, model


def test_crash_during_save_keeps_previous_latest(tmp_path, monkeypatch):
    accelerator, model = tiny_accelerator()
    save_checkpoint(accelerator, tmp_path, 1, {"epoch": 0}, "a: 1\n", keep_last=3)
    weights = model.weight.detach().clone()

    def crash(output_dir, **kwargs):
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        (Path(output_dir) / "model.safetensors").write_bytes(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(accelerator, "save_state", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(accelerator, tmp_path, 2, {"epoch": 0}, "a: 1\n", keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step-1"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-1"]
    with torch.no_grad():
        model.weight.zero_()
    assert load_checkpoint(accelerator, latest_checkpoint(tmp_path))["step"] == 1
    assert torch.equal(model.weight, weights)  # the previous checkpoint still loads whole

    monkeypatch.undo()
    save_checkpoint(accelerator, tmp_path, 2, {"epoch": 0}, "a: 1\n", keep_last=3)
    assert latest_checkpoint(tmp_path).name == "step-2"
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".tmp-step")]


def test_latest_falls_back_and_keep_last_prunes(tmp_path):
    accelerator, _ = tiny_accelerator()
    for step in (1, 2, 3, 4):
        save_checkpoint(accelerator, tmp_path, step, {}, "", keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-3", "step-4"]
    assert (tmp_path / "checkpoints" / LATEST).read_text().strip() == "step-4"
    (tmp_path / "checkpoints" / LATEST).write_text("step-9\n")  # names a folder that is gone
    assert latest_checkpoint(tmp_path).name == "step-4"
    (tmp_path / "checkpoints" / LATEST).unlink()
    assert latest_checkpoint(tmp_path).name == "step-4"
    save_checkpoint(accelerator, tmp_path, 4, {"again": True}, "", keep_last=2)  # the same step saved again
    assert json.loads((latest_checkpoint(tmp_path) / "loop_state.json").read_text())["again"] is True
