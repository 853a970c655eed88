"""The study's results: ``radstream report``, which turns probe, supervised and
MAE pretraining runs into the tables of the reference study.

    radstream report RUN_DIRS... --out RESULTS

Collects ``probe_results.json`` (``radstream.eval.probe``: every head of the grid), supervised ``results.json``
(``radstream.train.supervised`` and ``radstream.train.finetune``, whose rows are "MAE fine-tuned": one run per learning rate,
fraction and seed) and MAE pretraining runs (``radstream.train.pretrain``:
``summary.json`` with ``config.yaml`` beside it, one run per base learning rate) under the given folders,
recursively. Per (model, regime) it chooses the learning rate with the best validation accuracy averaged over
seeds (ties: the smaller rate) and reports the test top-1 accuracy at that rate as mean ± std over seeds (sample
std; "—" for one seed). Writes ``results.csv`` (every model × regime), ``results.md`` (Table 1: full data, Table
2: 1% of the labels, as the study, plus a 10% table; the study's figure beside ours) and
``accuracy_vs_fraction.png``. MAE runs get a table of their own in ``results.md`` ("MAE pretraining": one row
per run, the base LR with the lowest validation loss marked, as the study chose it; the study's test MSE
below) and ``pretrain.csv``, from ``radstream.report.report_mae``; files of a kind without runs are not written.
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radstream.core.atomic import write_text
from radstream.report.report_checks import flags, majority_rate, prior_rates
from radstream.report.report_files import (
    RENAMED_MODELS,
    RunRecord,
    collect,
    fmt_lr,
    to_csv,
)
from radstream.report.report_mae import (
    PretrainRecord,
    collect_pretrain,
    pretrain_csv,
    pretrain_markdown,
)
from radstream.train.metrics import mean_std

logger = logging.getLogger(__name__)

MODELS = (
    ("cnn", "CNN baseline"),
    ("vit", "ViT"),
    ("probe_flattened", "MAE probe (flattened)"),
    ("probe_mean", "MAE probe (mean)"),
    ("probe_cls", "MAE probe (CLS)"),
    ("mae_finetune", "MAE fine-tuned"),
)
"""Table rows: (model id used in the result files, label)."""
KNN_MODELS = (
    ("knn_cls", "MAE kNN (CLS)"),
    ("knn_mean", "MAE kNN (mean)"),
    ("knn_flattened", "MAE kNN (flattened)"),
)
"""Rows of the kNN evaluation (``radstream.eval.knn``), shown when a report holds its results."""
REGIMES = (
    (1.0, "Table 1: full data"),
    (0.01, "Table 2: 1% of the labels"),
    (0.1, "Table 3: 10% of the labels"),
)
"""Tables: (label fraction, title)."""
STUDY = {
    ("cnn", 1.0): 0.9912,
    ("vit", 1.0): 0.9685,
    ("probe_flattened", 1.0): 0.9604,
    ("probe_mean", 1.0): 0.9688,
    ("probe_cls", 1.0): 0.9692,
    ("cnn", 0.01): 0.4408,
    ("vit", 0.01): 0.7908,
    ("probe_flattened", 0.01): 0.8300,
    ("probe_mean", 0.01): 0.8312,
    ("probe_cls", 0.01): 0.8458,
}
"""The reference study's test top-1 accuracy (IRMA, 8 classes; ARCHITECTURE.md §1; its CNN is a ResNet50)."""
NAMED_ROWS = ("cnn",)
"""Rows whose label names the network that ran (``arch``: any timm CNN), e.g. "CNN baseline (resnet18)"."""
HEADER = ("Model", "Top-1 (ours)", "Top-1 (study)", "Chosen LR", "Seeds", "Architecture", "Init")
"""Columns of every accuracy table in results.md."""


# ------------------------------------------------------------------------------------ collect and select


@dataclass(frozen=True)
class Selection:
    """The chosen learning rate of one (model, regime) and the test accuracy over seeds at that rate."""

    model: str
    fraction: float
    lr: float
    val_acc_mean: float
    test_acc_mean: float
    test_acc_std: float
    seeds: tuple[int, ...]
    lrs_searched: int
    arch: str
    architecture: str = "?"
    init: str = "?"
    differs: tuple[str, ...] = ()
    under_trained: int = 0
    """Seeds of the chosen LR that ended on their epoch cap with their best epoch the last."""

    @property
    def spread(self) -> str:
        """The std over seeds, or "—" for one seed (a spread of one value is not 0, it is unknown)."""
        return f"{self.test_acc_std:.4f}" if len(self.seeds) > 1 else "—"


def select_best(records: Iterable[RunRecord]) -> list[Selection]:
    """Per (model, fraction): the LR with the best validation accuracy averaged over its seeds (ties: the
    smaller LR), with the mean ± std (sample std) of the test accuracy over those seeds."""
    by_lr: dict[tuple[str, float], dict[float, list[RunRecord]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        by_lr[(r.model, r.fraction)][r.lr].append(r)
    out = []
    for (model, fraction), runs in sorted(by_lr.items()):
        lrs = sorted(runs)
        val = [float(np.mean([r.val_acc for r in runs[lr]])) for lr in lrs]
        lr = lrs[int(np.argmax(val))]  # first maximum over ascending LRs: the smaller on ties
        chosen = sorted(runs[lr], key=lambda r: r.seed)
        mean, std = mean_std([r.test_acc for r in chosen])
        arch = ", ".join(sorted({r.arch for r in chosen}))
        named = {"architecture": "; ".join(sorted({r.architecture for r in chosen})),
                 "init": "; ".join(sorted({r.init for r in chosen})),
                 "differs": tuple(dict.fromkeys(d for r in chosen for d in r.differs)),
                 "under_trained": sum(r.under_trained for r in chosen)}  # fmt: skip
        out.append(
            Selection(
                model,
                fraction,
                lr,
                max(val),
                mean,
                std,
                tuple(r.seed for r in chosen),
                len(lrs),
                arch,
                **named,
            )  # fmt: skip
        )
    return out


# --------------------------------------------------------------------------------------- tables and plot


def _regimes(selections: Sequence[Selection]) -> list[tuple[float, str]]:
    """The study's regimes first, then any other label fraction the runs hold."""
    known = [f for f, _ in REGIMES]
    extra = sorted({s.fraction for s in selections if not any(math.isclose(s.fraction, f) for f in known)})
    return list(REGIMES) + [(f, f"Label fraction {f:g}") for f in extra]


def _find(selections: Sequence[Selection], model: str, fraction: float) -> Selection | None:
    return next((s for s in selections if s.model == model and math.isclose(s.fraction, fraction)), None)


def markdown(
    selections: Sequence[Selection], pretrain: Sequence[PretrainRecord] = (), majority: float | None = None,
    priors: dict[float, float] | None = None,
) -> str:  # fmt: skip
    """results.md: one accuracy table per regime, rows in the study's order, the study's figure beside ours,
    under each the rate of a model that learned only the class prior of its training labels (and the rows at
    or below it), the majority-class rate after them; then the MAE pretraining runs, if any (without accuracy
    results, only they)."""
    lines = ["# Results"]
    if selections or not pretrain:
        lines += _accuracy_tables(selections, priors or {})
        if majority is not None:
            lines += ["", f"Majority-class rate of the test split: {majority:.4f} (the prior-only rate wherever the "
                      "training labels share the test split's most common class; a regime of one image per class "
                      "shows no prior, and its bar is the mean class share)."]  # fmt: skip
    if pretrain:
        lines += pretrain_markdown(pretrain)
    return "\n".join(lines) + "\n"


def _accuracy_tables(selections: Sequence[Selection], priors: dict[float, float]) -> list[str]:
    lines = [
        "",
        "Test top-1 accuracy, mean ± std over seeds (sample std; — for one seed). The spread covers which images",
        "carry labels: seed k of every model (probes, kNN, baselines, fine-tuning) trains on its own labelled",
        "subset k of the training split (patient-grouped, class-stratified, nested across fractions; seed 0 the",
        "build's), with its own initialisation and batch order; with all labels only the latter two vary.",
        "Learning rate chosen per model and regime on validation accuracy (mean over seeds). ⚠ not trained: at",
        "or below the regime's prior-only rate; ⚠ may be under-trained: seeds that ended on their epoch cap with",
        "their best validation epoch the last (early stopping never said they had stopped improving). Study: the",
        "reference study (IRMA, 8 body regions; ARCHITECTURE.md §1): ViT-B/16 (768×12, patch 16) and ResNet50 at",
        "224x224, from ImageNet weights.",
    ]
    for fraction, title in _regimes(selections):
        lines += ["", f"## {title}", "", "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        notes = []
        knn = [(m, label) for m, label in KNN_MODELS if any(s.model == m for s in selections)]
        for model, label in [*MODELS, *knn]:
            sel, study = _find(selections, model, fraction), STUDY.get((model, fraction))
            study_text = f"{study:.4f}" if study is not None else "—"
            if sel is None:
                lines.append(f"| {label} | — | {study_text} | — | 0 | — | — |")
                continue
            prior = next((r for f, r in priors.items() if math.isclose(f, fraction)), None)
            ours = f"{sel.test_acc_mean:.4f} ± {sel.spread}" + flags(
                sel.test_acc_mean, len(sel.seeds), sel.under_trained, prior
            )
            lr = "—" if model.startswith("knn_") else fmt_lr(sel.lr)
            lines.append(f"| {model_label(sel.model, sel.arch)} | {ours} | {study_text} | {lr} | {len(sel.seeds)} | "
                         f"{sel.architecture} | {sel.init} |")  # fmt: skip
            if sel.differs:
                notes.append(f"{label}: {', '.join(sel.differs)}")
        if notes:
            lines += ["", "Differs from the study's: " + "; ".join(notes) + "."]
        prior = next((r for f, r in priors.items() if math.isclose(f, fraction)), None)
        if prior is not None:
            lines += ["", f"Prior-only rate: {prior:.4f} (always answering the most common class of this "
                      "regime's training labels; a model at or below it has learned nothing it was shown)."]  # fmt: skip
            low = [model_label(sel.model, sel.arch) for model, label in [*MODELS, *KNN_MODELS]
                   if (sel := _find(selections, model, fraction)) is not None and sel.test_acc_mean <= prior]  # fmt: skip
            if low:
                lines.append(f"At or below it: {', '.join(low)}.")
    return lines


def model_label(model: str, arch: str) -> str:
    """The name of a row's network, in the tables and in every picture: the row's label, naming what its
    flattened aggregation is, e.g. "MAE probe (flattened (14×14))", and the network of a ``NAMED_ROWS`` row,
    e.g. "CNN baseline (resnet18)"."""
    model = RENAMED_MODELS.get(model, model)
    label = dict(MODELS + KNN_MODELS).get(model, model)
    named = arch.split(", ")[-1]
    if model in NAMED_ROWS and arch not in ("?", ""):
        return f"{label} ({arch})"
    return f"{label.split(' (')[0]} ({named})" if named.startswith("flattened (") else label


def csv_text(selections: Sequence[Selection]) -> str:
    """results.csv: one row per (regime, model) with a result."""
    fields = ["fraction", "model", "label", "arch", "test_acc_mean", "test_acc_std", "val_acc_mean", "lr",
              "n_seeds", "seeds", "lrs_searched", "study_test_acc", "architecture", "init", "differs"]  # fmt: skip
    labels = dict(MODELS + KNN_MODELS)
    rows = [
        [s.fraction, s.model, labels.get(s.model, s.model), s.arch, f"{s.test_acc_mean:.6f}",
         f"{s.test_acc_std:.6f}" if len(s.seeds) > 1 else "", f"{s.val_acc_mean:.6f}", s.lr, len(s.seeds),
         " ".join(map(str, s.seeds)), s.lrs_searched, STUDY.get((s.model, s.fraction), ""), s.architecture,
         s.init, "; ".join(s.differs)]
        for s in selections
    ]  # fmt: skip
    return to_csv(fields, rows)


def plot_fractions(selections: Sequence[Selection], path: str | Path) -> None:
    """Test accuracy against label fraction per model (log x), error bars = std over seeds; the study's
    figures as open markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    order = [m for m, _ in MODELS] + sorted({s.model for s in selections} - {m for m, _ in MODELS})
    labels = dict(MODELS + KNN_MODELS)
    for i, model in enumerate(order):
        points = sorted((s for s in selections if s.model == model), key=lambda s: s.fraction)
        if not points:
            continue
        color = f"C{i}"
        named = model_label(model, points[-1].arch) if points[-1].arch else labels.get(model, model)
        ax.errorbar([p.fraction for p in points], [p.test_acc_mean for p in points],
                    yerr=[p.test_acc_std for p in points], marker="o", capsize=3, color=color,
                    label=named)  # fmt: skip
        study = sorted((f, acc) for (m, f), acc in STUDY.items() if m == model)
        xs, ys = [f for f, _ in study], [a for _, a in study]
        ax.plot(xs, ys, linestyle="none", marker="o", mfc="none", color=color)
    ax.set_xscale("log")
    ax.set_xlabel("label fraction of the training set")
    ax.set_ylabel("test top-1 accuracy")
    ax.set_title("Accuracy against label fraction (open markers: the study)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run_dirs: Iterable[str | Path], out: str | Path) -> list[Selection]:
    """Collect the runs, choose LRs and write to ``out``: results.md; with accuracy results results.csv and
    accuracy_vs_fraction.png; with MAE pretraining runs pretrain.csv.

    Returns:
        The chosen LR and test accuracy per (model, regime); empty for MAE runs only.

    Raises:
        ValueError: no probe, supervised or MAE pretraining result under ``run_dirs``.
    """

    run_dirs = list(run_dirs)
    records, pretrain = collect(run_dirs), collect_pretrain(run_dirs)
    if not records and not pretrain:
        raise ValueError(
            "no probe_results.json, supervised results.json or MAE summary.json under "
            + ", ".join(map(str, run_dirs))
        )
    selections = select_best(records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if selections:
        write_text(out / "results.csv", csv_text(selections))
        plot_fractions(selections, out / "accuracy_vs_fraction.png")
    if pretrain:
        write_text(out / "pretrain.csv", pretrain_csv(pretrain))
    write_text(
        out / "results.md", markdown(selections, pretrain, majority_rate(run_dirs), prior_rates(run_dirs))
    )
    return selections
