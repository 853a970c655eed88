"""The on-disk contract of a run folder, as ``shards/layout.py`` is the dataset's: the names every writer and
reader of ``run_dir`` shares, and which weights "the weights of a run" are.

    RUN/config.yaml            the resolved config (radstream.train.trainer)
    RUN/metrics.jsonl          one line per log window, validation and test
    RUN/checkpoints/step-N/    resumable state (written by radstream.train.checkpoint; found here: latest_checkpoint),
                               RUN/checkpoints/latest names the newest
    RUN/best/model.safetensors the weights of the best validation epoch, with best/meta.json
    RUN/summary.json           an MAE run's results (radstream.train.pretrain)
    RUN/results.json           a classifier's or a fine-tuning run's results (radstream.train.supervised, radstream.train.finetune)
    RUN/lr-<rate>/             one rate of a sweep (radstream.train.sweep)
    OUT/probe_results.json     a probe grid's results, OUT/knn_results.json the kNN's (radstream.eval.probe, radstream.eval.knn)

The weights of a run are ``best/`` (the best validation epoch: the weights every test score of the run is
computed with, ``run.test_on_best``), and only when a run has no validation epoch yet its latest checkpoint.
Every reader (embeddings, fine-tuning, export) asks ``resolve_weights``, so a run means the same weights
everywhere.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
CHECKPOINTS = "checkpoints"
BEST = "best"
WEIGHTS = "model.safetensors"
"""The weights file of ``best/`` and of an exported encoder (safetensors, the task model's state dict)."""
META = "meta.json"
"""Beside a weights file: the epoch, step and validation score it was saved at."""
SUMMARY = "summary.json"
RESULTS = "results.json"
PROBE_RESULTS = "probe_results.json"
KNN_RESULTS = "knn_results.json"
LATEST = "latest"
"""``checkpoints/latest``: a file naming the newest complete ``step-N`` folder."""
LOOP_STATE = "loop_state.json"
STEP_DIR = re.compile(r"^step-(\d+)$")
RESULT_FILES = (PROBE_RESULTS, RESULTS, KNN_RESULTS)
"""The result files of the evaluation rows (``radstream report``)."""


def checkpoints_dir(run_dir: str | os.PathLike[str]) -> Path:
    """The folder holding a run's checkpoints."""
    return Path(run_dir) / CHECKPOINTS


def list_checkpoints(run_dir: str | os.PathLike[str]) -> list[Path]:
    """Complete checkpoints (``step-N`` folders with a loop state), oldest first."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m[1]), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / LOOP_STATE).is_file()
    ]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """The checkpoint to resume from: the one ``latest`` names, else (``latest`` missing or naming a folder
    that is gone) the newest complete one; None when there is none."""
    root = checkpoints_dir(run_dir)
    pointer = root / LATEST
    if pointer.is_file():
        named = root / pointer.read_text().strip()
        if STEP_DIR.match(named.name) and (named / LOOP_STATE).is_file():
            return named
        logger.warning(
            "%s names %r, which is not a complete checkpoint; using the newest one", pointer, named.name
        )
    complete = list_checkpoints(run_dir)
    return complete[-1] if complete else None


def lr_dir(lr: float) -> str:
    """The folder name of one rate of a sweep: ``lr-<rate>`` (``%g``: 1e-05, 0.00013)."""
    return f"lr-{lr:g}"


def best_dir(run_dir: str | os.PathLike[str]) -> Path:
    """``run_dir/best``: the weights of the best validation epoch."""
    return Path(run_dir) / BEST


@dataclass(frozen=True)
class RunWeights:
    """The weights of a run, found by ``resolve_weights``."""

    folder: Path
    """The folder holding the weights file: ``RUN/best``, a checkpoint's ``step-N`` or the folder given."""
    label: str
    """"best" (the best validation epoch), "latest" (the newest checkpoint of a run without a validation
    epoch) or "given" (a weights or checkpoint folder named directly)."""


def is_run_dir(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a training run folder (its resolved config and best weights or checkpoints)."""
    path = Path(path)
    return (path / CONFIG).is_file() and ((path / BEST).is_dir() or (path / CHECKPOINTS).is_dir())


def resolve_weights(path: str | os.PathLike[str]) -> RunWeights:
    """The weights ``path`` names: a run folder's ``best/``, else its latest checkpoint; a ``best/`` or
    ``step-N`` folder as it is; ``RUN/checkpoints/latest`` (the pointer file) as the folder it names.

    Raises:
        FileNotFoundError: a run folder with neither best weights nor a complete checkpoint.
    """
    path = Path(path)
    if path.is_file():  # the `latest` pointer: a file holding the step folder's name
        return RunWeights(path.parent / path.read_text().strip(), "given")
    if not is_run_dir(path):
        return RunWeights(path, "best" if path.name == BEST else "given")
    if (path / BEST / WEIGHTS).is_file():
        return RunWeights(path / BEST, "best")
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(
            f"{path}: run folder without {BEST}/{WEIGHTS} and without a complete checkpoint"
        )
    return RunWeights(latest, "latest")
