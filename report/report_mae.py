"""MAE pretraining in ``radstream report``: the runs of ``radstream.train.pretrain`` (``summary.json`` with ``config.yaml``
beside it, one run per base learning rate), the base LR chosen on the lowest validation loss as the study chose it,
and their table in ``results.md`` ("MAE pretraining") and ``pretrain.csv``.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from radstream.report.report_files import fmt_lr, read_result, refuse_twice, result_files, to_csv
from radstream.shards.manifest import read_manifest
from radstream.train.provenance import architecture_text, differences, encoder_dims, init_name, manifest_bins
from radstream.train.run_layout import CONFIG, SUMMARY

logger = logging.getLogger(__name__)

MAE_TITLE = "MAE pretraining"
MAE_HEADER = (
    "Run", "Base LR", "Peak LR", "Best val loss", "Study MSE", "Test objective", "Objective", "Epochs", "Stopped",
    "Architecture", "Init", "Chosen",
)  # fmt: skip
"""Columns of the MAE pretraining table in results.md."""
MAE_STUDY = {"test_mse": 0.002475, "epochs": 36}
"""The reference study's MAE: test MSE and the epoch early stopping ended it at (ARCHITECTURE.md §1)."""


@dataclass(frozen=True)
class PretrainRecord:
    """One MAE pretraining run: ``radstream.train.pretrain``'s summary.json and the config.yaml beside it."""

    run: str
    """The run folder's name (``lr-<rate>`` in a sweep)."""
    base_lr: float
    """The rate per 256 images (``optim.lr`` under ``optim.lr_rule: per_256``), the one a sweep varies."""
    peak_lr: float
    """The absolute rate it trained with (base_lr x global batch / 256)."""
    seed: int
    best_val_loss: float | None
    """Validation loss (the MAE objective) of the best epoch; None when no epoch ended."""
    test_mse: float | None
    """Pixel MSE over every masked patch (background included) on the test split: the study's figure; None
    for a norm_pix_loss run (no leak-free pixel prediction)."""
    epochs: int
    """Epochs completed."""
    stopped: str
    """Why training ended: done | early_stop | max_steps."""
    source: str
    test_mse_foreground: float | None = None
    """Pixel MSE over the masked foreground patches only (border-aware masking scores these)."""
    architecture: str = "?"
    """The encoder: width × depth, patch, input bins (``radstream.train.provenance.architecture_text``)."""
    init: str = "?"
    """How pretraining started: scratch, a timm tag, a weights file."""
    differs: tuple[str, ...] = ()
    """Where the encoder or its init differs from the study's."""
    study_mse: float | None = None
    """The study's one MSE (``radstream.train.mae_step.study_mse``): [0, 1] pixels over a uniform random 75% mask of
    all patches, the same masks for every model of the dataset; None for norm_pix_loss or older runs."""
    objective: str = "?"
    """The name of the run's own objective (e.g. "pixel MSE, masked foreground patches")."""
    test_loss: float | None = None
    """The run's own objective on the test split."""


def _pretrain_record(path: Path, data: dict) -> PretrainRecord | None:
    """The record of a summary.json, or None when it is not one of ``radstream.train.pretrain``."""
    if not {"best_val_loss", "test_mse", "epochs_completed", "peak_lr"} <= data.keys():
        logger.debug("%s: not an MAE pretraining summary, skipped", path)
        return None
    config = path.parent / CONFIG
    cfg = OmegaConf.load(config) if config.is_file() else OmegaConf.create()
    per_256 = OmegaConf.select(cfg, "optim.lr_rule") == "per_256"
    base_lr = OmegaConf.select(cfg, "optim.lr") if per_256 else OmegaConf.select(cfg, "optim.base_lr")
    if base_lr is None:  # an absolute rate, or no config: back from the peak rate, peak = base x batch / 256
        base_lr = float(f"{data['peak_lr'] * 256 / data['global_batch']:.6g}")
    best = data["best_val_loss"]
    arch, init = _encoder_provenance(cfg)
    return PretrainRecord(
        path.parent.name, float(base_lr), float(data["peak_lr"]), int(OmegaConf.select(cfg, "run.seed") or 0),
        None if best is None else float(best), _float(data["test_mse"]), int(data["epochs_completed"]),
        str(data.get("stopped", "")), str(path), _float(data.get("test_mse_foreground")),
        architecture_text(arch), init, tuple(differences(arch, init)), _float(data.get("test_mse_study")),
        str(data.get("objective", "?")), _float(data.get("test_loss")),
    )  # fmt: skip


def _encoder_provenance(cfg) -> tuple[dict | None, str]:
    """(the encoder's architecture, its init) from a pretraining run's config; (None, "?") without one."""
    model = OmegaConf.to_container(cfg.model, resolve=True) if "model" in cfg else None
    if not model or "encoder" not in model:
        return None, "?"
    try:
        bins = manifest_bins(read_manifest(cfg.shards)) if "shards" in cfg else []
    except (FileNotFoundError, ValueError):
        bins = []
    return {"kind": "mae", "name": model["encoder"], **encoder_dims(model), "bins": bins}, init_name(
        model.get("init")
    )


def _float(value) -> float | None:
    return None if value is None else float(value)


def _study(r: PretrainRecord) -> str:
    """The study MSE cell: n/a for norm_pix_loss, — for a run from before the study MSE."""
    if r.study_mse is not None:
        return f"{r.study_mse:.4g}"
    return "n/a (norm_pix)" if r.objective.startswith("normalised") else "—"


def collect_pretrain(run_dirs: Iterable[str | Path]) -> list[PretrainRecord]:
    """Every MAE pretraining run (``summary.json``) under ``run_dirs`` (searched recursively).

    Raises:
        FileNotFoundError: a run folder that does not exist.
        ValueError: an unreadable summary, or the same (base LR, seed) found twice.
    """
    records = [
        r
        for path in result_files(run_dirs, (SUMMARY,))
        if (r := _pretrain_record(path, read_result(path))) is not None
    ]
    refuse_twice(records, lambda r: (r.base_lr, r.seed), "MAE base lr {0} seed {1}")
    return records


def choose_pretrain_lr(records: Iterable[PretrainRecord]) -> float | None:
    """The base LR with the lowest best validation loss averaged over its seeds (ties: the smaller rate), as
    the study chose the MAE's; None when no run has a validation loss."""
    by_lr: dict[float, list[float]] = defaultdict(list)
    for r in records:
        if r.best_val_loss is not None:
            by_lr[r.base_lr].append(r.best_val_loss)
    return min(sorted(by_lr), key=lambda lr: float(np.mean(by_lr[lr])), default=None)


def pretrain_markdown(records: Sequence[PretrainRecord]) -> list[str]:
    """The "MAE pretraining" section of results.md: a row per run (by base LR), the chosen one marked ✓,
    the study's figures last."""
    chosen = choose_pretrain_lr(records)
    lines = [
        "", f"## {MAE_TITLE}", "",
        "Study MSE: the study's quantity, the same for every model: [0, 1] pixels over the hidden patches of a",
        "uniform random 75% mask of all patches (one fixed seed, the same masks for every model of the dataset),",
        "on the test split. Test objective: the run's own loss on the test split, named in Objective (a",
        "border-aware run scores only masked foreground patches). Validation loss: that objective on the",
        "validation split, best epoch. No pixel MSE for norm_pix_loss runs (n/a): their predictions are",
        "normalised patches. Base LR chosen on the lowest validation loss (mean over seeds), as the study: ✓.",
        "", "| " + " | ".join(MAE_HEADER) + " |", "|" + "---|" * len(MAE_HEADER),
    ]  # fmt: skip
    for r in sorted(records, key=lambda r: (r.base_lr, r.seed)):
        val = "—" if r.best_val_loss is None else f"{r.best_val_loss:.4g}"
        loss = "—" if r.test_loss is None else f"{r.test_loss:.4g}"
        cells = [r.run, fmt_lr(r.base_lr), fmt_lr(r.peak_lr), val, _study(r), loss, r.objective, r.epochs,
                 r.stopped, r.architecture, r.init]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + (" | ✓ |" if r.base_lr == chosen else " |  |"))
    study = MAE_STUDY
    lines.append(f"| Study | — | — | — | {study['test_mse']:.4g} | — | — | {study['epochs']} | early_stop | "
                 "ViT 768×12, patch 16, 224x224 | ImageNet |  |")  # fmt: skip
    differs = list(dict.fromkeys(d for r in records for d in r.differs))
    if differs:
        lines += ["", "Differs from the study's: " + ", ".join(differs) + "."]
    return lines


def pretrain_csv(records: Sequence[PretrainRecord]) -> str:
    """pretrain.csv: one row per MAE run, by base LR; ``chosen`` is 1 on the rows of the chosen rate."""
    chosen = choose_pretrain_lr(records)
    fields = ["run", "base_lr", "peak_lr", "seed", "best_val_loss", "test_mse", "epochs", "stopped", "chosen",
              "study_test_mse", "source", "test_mse_foreground", "test_mse_study", "objective", "test_loss"]  # fmt: skip
    rows = [
        [r.run, r.base_lr, r.peak_lr, r.seed, _blank(r.best_val_loss), _blank(r.test_mse), r.epochs, r.stopped,
         int(r.base_lr == chosen), MAE_STUDY["test_mse"], r.source, _blank(r.test_mse_foreground),
         _blank(r.study_mse), r.objective, _blank(r.test_loss)]
        for r in sorted(records, key=lambda r: (r.base_lr, r.seed))
    ]  # fmt: skip
    return to_csv(fields, rows)


def _blank(value: float | None) -> float | str:
    return "" if value is None else value
