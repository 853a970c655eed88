"""The result files of runs, read once for ``radstream report`` and the model card: finding and reading them,
one record per (model, fraction, LR, seed), the results that name a model's weights, refusing mixed sets of
runs, number and CSV formatting."""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from radstream.train.provenance import architecture_text, differences
from radstream.train.run_layout import (
    CHECKPOINTS,
    RESULT_FILES,
)

logger = logging.getLogger(__name__)


def result_files(run_dirs: Iterable[str | Path], names: Sequence[str]) -> list[Path]:
    """The files called ``names`` under ``run_dirs``, searched recursively; a file given is taken as it is.

    Raises:
        FileNotFoundError: a run folder that does not exist.
    """
    files: list[Path] = []
    for root in map(Path, run_dirs):
        if not root.exists():
            raise FileNotFoundError(f"{root}: no such run folder")
        files += [root] if root.is_file() else [p for name in names for p in sorted(root.rglob(name))]
    return files


def read_result(path: Path) -> dict:
    """A result file's JSON; ValueError naming the file when it does not parse."""
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise ValueError(f"{path}: unreadable result file ({err})") from None


def refuse_twice(records: Sequence, key, what: str) -> None:
    """Raise ValueError when two records share ``key(record)`` (``what`` formats the key for the message):
    two sets of runs mixed, whose selection would mean nothing."""
    seen: dict[tuple, str] = {}
    for r in records:
        k = key(r)
        if k in seen:
            raise ValueError(
                f"{what.format(*k)} appears in both {seen[k]} and {r.source}; report one set of runs at a time"
            )
        seen[k] = r.source


def fmt_lr(lr: float) -> str:
    """A learning rate as the tables show it (3 significant digits)."""
    return f"{lr:.3g}"


def to_csv(fields: Sequence[str], rows: Iterable[Sequence]) -> str:
    """CSV text: a header line, then one line per row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(fields)
    writer.writerows(rows)
    return buffer.getvalue()


RENAMED_MODELS = {"resnet50": "cnn"}
"""Row ids of result files written by earlier versions."""


@dataclass(frozen=True)
class RunRecord:
    """One trained model (a probe head or a supervised run): what LR selection and the tables need."""

    model: str
    """Row id: one of ``MODELS`` (``cnn``, ``vit``, ``probe_<aggregation>``, ``mae_finetune``)."""
    fraction: float
    seed: int
    lr: float
    val_acc: float
    test_acc: float
    arch: str
    """What actually ran (timm name, or the probe's aggregation)."""
    source: str
    """The result file it came from."""
    architecture: str = "?"
    """Width × depth, patch and input bins (``radstream.train.provenance.architecture_text``); "?" for older files."""
    init: str = "?"
    """The initialisation: scratch, a timm tag, a weights file, an MAE run."""
    differs: tuple[str, ...] = ()
    """Where the network differs from the study's (``radstream.train.provenance.differences``)."""
    under_trained: bool = False
    """The run ended on its epoch cap with its best validation epoch the last: it may still have improved."""


def _provenance(data: dict) -> dict:
    """The record fields naming a result file's network and initialisation."""
    arch, init = data.get("architecture"), data.get("init")
    if arch is None and init is None:
        return {}
    return {
        "architecture": architecture_text(arch),
        "init": init or "?",
        "differs": tuple(differences(arch, init)),
    }


def _probe_records(path: Path, data: dict) -> list[RunRecord]:
    names, named = data.get("aggregation_labels", {}), _provenance(data)
    return [
        RunRecord(h["model"], round(float(h["fraction"]), 6), int(h["seed"]), float(h["lr"]), float(h["val_acc"]),
                  float(h["test_acc"]), f"MAE probe, {names.get(h['aggregation'], h['aggregation'])}", str(path),
                  **named, under_trained=under_trained(h))
        for h in data["heads"]
    ]  # fmt: skip


def _knn_records(path: Path, data: dict) -> list[RunRecord]:
    """kNN results: no learning rate (0); one record per seed's labelled subset (seed 0 in older files)."""
    names, named = data.get("aggregation_labels", {}), _provenance(data)
    return [
        RunRecord(r["model"], round(float(r["fraction"]), 6), int(r.get("seed", 0)), 0.0, float(r["val_acc"]),
                  float(r["test_acc"]),
                  f"kNN k={r['k']} T={r['temperature']:g}, {names.get(r['aggregation'], r['aggregation'])}",
                  str(path), **named)
        for r in data["results"]
    ]  # fmt: skip


def _supervised_record(path: Path, data: dict) -> RunRecord:
    return RunRecord(
        RENAMED_MODELS.get(data["model"], data["model"]), round(float(data["fraction"]), 6), int(data["seed"]),
        float(data["lr"]),
        float(data["val_acc"]), float(data["test_acc"]), str(data.get("arch", data["model"])), str(path),
        **_provenance(data), under_trained=under_trained(data),
    )  # fmt: skip


def collect(run_dirs: Iterable[str | Path]) -> list[RunRecord]:
    """Every probe head and supervised run under ``run_dirs`` (searched recursively).

    Raises:
        FileNotFoundError: a run folder that does not exist.
        ValueError: an unreadable result file, or the same (model, fraction, lr, seed) found twice.
    """
    records: list[RunRecord] = []
    for path in result_files(run_dirs, RESULT_FILES):
        data = read_result(path)
        if data.get("kind") == "probe":
            records += _probe_records(path, data)
        elif data.get("kind") == "knn":
            records += _knn_records(path, data)
        elif data.get("kind") == "supervised":
            records.append(_supervised_record(path, data))
        else:
            logger.debug("%s: not a probe or supervised result, skipped", path)
    refuse_twice(records, lambda r: (r.model, r.fraction, r.lr, r.seed), "{0} fraction {1} lr {2} seed {3}")
    return records


SEARCH_DEPTH = 4
"""Folder levels searched below the run's parent when no ``--results`` is given (a run inside a large folder
must not make the export walk all of it)."""


def find_results(run_dir: Path, folder: Path, results: Sequence[str | Path] | None) -> list[Path]:
    """Result files that refer to the weights in ``folder``.

    Raises:
        FileNotFoundError: a ``results`` folder that does not exist.
    """
    if results:
        missing = [str(r) for r in results if not Path(r).exists()]
        if missing:
            raise FileNotFoundError(f"{missing[0]}: no such results folder")
        candidates = [p for r in map(Path, results) for p in _walk(r, depth=None)]
    else:
        candidates = _walk(run_dir.resolve().parent, depth=SEARCH_DEPTH)
    target = folder.resolve()
    found = []
    for path in candidates:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            logger.warning("model card: %s unreadable, skipped", path)
            continue
        if any(_is_within(ref, target) for ref in _references(data)):
            found.append(path)
    return found


def _walk(root: Path, depth: int | None) -> Iterable[Path]:
    """Result files under ``root`` (or ``root`` itself when it is a file), at most ``depth`` levels down;
    hidden folders and checkpoint folders are skipped."""
    if root.is_file():
        return [root]
    found = []
    base = len(root.parts)
    for current, dirs, files in os.walk(root):
        level = len(Path(current).parts) - base
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != CHECKPOINTS)
        if depth is not None and level >= depth:
            dirs[:] = []
        found += [Path(current) / f for f in sorted(files) if f in RESULT_FILES]
    return found


def _references(data: dict) -> list[str]:
    """The checkpoints a result file names: a probe's ``checkpoint``, a run's ``model.init``."""
    config = data.get("config") if isinstance(data.get("config"), dict) else {}
    model = config.get("model") if isinstance(config.get("model"), dict) else {}
    refs = [data.get("checkpoint"), data.get("init"), model.get("init"), config.get("checkpoint")]
    return [str(r) for r in refs if r]


def _is_within(ref: str, target: Path) -> bool:
    """Whether ``ref`` names ``target`` or a file in it (relative paths: from the working directory)."""
    path = Path(ref).resolve()
    return path == target or path.parent == target


def _jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def under_trained(data: dict) -> bool:
    """Whether a result (a supervised run or a probe head) ended on its epoch cap with its best validation
    epoch the last one: early stopping never said it had stopped improving."""
    capped = data.get("capped", data.get("stopped") == "done")
    return (
        bool(capped) and "best_epoch" in data and int(data["best_epoch"]) == int(data.get("epochs", -1)) - 1
    )
