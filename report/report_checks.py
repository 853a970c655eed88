"""Whether a row of the study's tables trained at all: the prior-only rate of each regime (what a model that
learned only the class prior it was shown scores), the test split's majority-class rate, and the runs that ended
on their epoch cap with their best validation epoch the last (they may still have improved). ``radstream.report.report``
flags its rows with them; ``radstream demo`` draws them on the baseline curves.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

from radstream.report.report_files import read_result, result_files
from radstream.train.run_layout import RESULTS


def majority_rate(run_dirs: Iterable[str | Path]) -> float | None:
    """The test split's majority-class rate (the accuracy of always answering the largest class), from the
    confusion matrix of a supervised results.json; None without one."""
    for path in result_files(run_dirs, (RESULTS,)):
        cm = np.asarray(read_result(path).get("confusion") or [], dtype=float)
        if cm.size and cm.sum() > 0:
            return float(cm.sum(axis=1).max() / cm.sum())
    return None


def prior_rates(run_dirs: Iterable[str | Path]) -> dict[float, float]:
    """Per label fraction, the test accuracy of always answering the most common class of that fraction's
    training labels (ties: the mean over the tied classes) — what a model that learned only the class prior
    it was shown scores. From supervised results.json files (``confusion`` and ``train_class_counts``).

    With all labels it is the test split's majority-class rate; a fraction that holds one image per class
    shows no prior at all, and its rate is the mean class share (chance, 1 / classes, when balanced)."""
    rates: dict[float, float] = {}
    for path in result_files(run_dirs, (RESULTS,)):
        data = read_result(path)
        cm, counts = np.asarray(data.get("confusion") or [], float), data.get("train_class_counts")
        if not counts or not cm.size or cm.sum() <= 0 or len(counts) != len(cm):
            continue
        share, counts = cm.sum(axis=1) / cm.sum(), np.asarray(counts)
        rates.setdefault(round(float(data["fraction"]), 6), float(share[counts == counts.max()].mean()))
    return rates


def flags(test_acc_mean: float, seeds: int, capped_seeds: int, prior: float | None) -> str:
    """The row's warnings: not trained (at or below the prior-only rate), may be under-trained (seeds that
    ended on their epoch cap with their best epoch the last)."""
    out = " ⚠ not trained (≤ prior-only)" if prior is not None and test_acc_mean <= prior else ""
    if capped_seeds:
        out += f" ⚠ may be under-trained ({capped_seeds}/{seeds} seeds best at the cap)"
    return out
