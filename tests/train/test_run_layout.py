"""The run layout: which weights "the weights of a run" are, the same for every reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from radstream.train.checkpoint import resolve_checkpoint
from radstream.train.run_layout import BEST, CONFIG, LOOP_STATE, WEIGHTS, lr_dir, resolve_weights


def _run(tmp_path: Path, *, best: bool, steps: tuple[int, ...]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / CONFIG).write_text("model: {}\n")
    for step in steps:
        folder = run / "checkpoints" / f"step-{step}"
        folder.mkdir(parents=True)
        (folder / LOOP_STATE).write_text("{}")
        (folder / CONFIG).write_text("model: {}\n")
    if steps:
        (run / "checkpoints" / "latest").write_text(f"step-{steps[-1]}\n")
    if best:
        (run / BEST).mkdir()
        (run / BEST / WEIGHTS).write_bytes(b"")
    return run


def test_a_run_means_its_best_weights_then_its_latest_checkpoint(tmp_path):
    run = _run(tmp_path, best=True, steps=(2, 4))
    assert resolve_weights(run).folder == run / BEST
    assert resolve_weights(run).label == "best"
    # the embeddings read the same weights as fine-tuning and export (they read the latest checkpoint before)
    assert resolve_checkpoint(run) == (run / BEST, run / CONFIG)
    (run / BEST / WEIGHTS).unlink()
    assert resolve_weights(run) == type(resolve_weights(run))(run / "checkpoints" / "step-4", "latest")


def test_named_folders_are_taken_as_they_are(tmp_path):
    run = _run(tmp_path, best=True, steps=(3,))
    assert resolve_weights(run / "checkpoints" / "latest").folder == run / "checkpoints" / "step-3"
    assert resolve_weights(run / "checkpoints" / "step-3").label == "given"
    assert resolve_weights(run / BEST).label == "best"


def test_a_run_without_weights_is_refused(tmp_path):
    run = _run(tmp_path, best=False, steps=())
    (run / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="without best/model.safetensors"):
        resolve_weights(run)


def test_sweep_folders_name_the_rate():
    assert [lr_dir(r) for r in (1e-5, 1.3e-4, 3e-3)] == ["lr-1e-05", "lr-0.00013", "lr-0.003"]
