"""Classification metrics from a confusion matrix, mean ± std over seeds, and the confusion matrix as a picture;
shared by the supervised task, the linear probes and ``radstream report``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [C, C]: row = true class, column = predicted class."""
    y_true, y_pred = np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)
    flat = np.bincount(y_true * num_classes + y_pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def per_class_recall(cm: np.ndarray) -> list[float | None]:
    """Recall of each class; None for a class with no samples."""
    totals = cm.sum(axis=1)
    return [float(cm[i, i] / t) if t else None for i, t in enumerate(totals)]


def balanced_accuracy(cm: np.ndarray) -> float:
    """Mean recall over the classes that have samples."""
    recalls = [r for r in per_class_recall(cm) if r is not None]
    return float(np.mean(recalls)) if recalls else 0.0


def accuracy(cm: np.ndarray) -> float:
    """Top-1 accuracy from a confusion matrix."""
    total = cm.sum()
    return float(np.trace(cm) / total) if total else 0.0


def plot_confusion(cm: np.ndarray, class_names: Sequence[str], path: str | Path, title: str) -> None:
    """Row-normalised confusion matrix as a PNG (counts written in the cells)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    totals = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=float), where=totals > 0)
    size = 1.0 + 0.6 * len(class_names)
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            color = "white" if norm[i, j] > 0.5 else "black"
            ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", color=color)
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    arr = np.asarray(values, dtype=float)
    return float(arr.mean()), (float(arr.std(ddof=1)) if len(arr) > 1 else 0.0)
