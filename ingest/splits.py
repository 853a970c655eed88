"""Splits: train / val / test by patient and stratified by class, and nested label fractions of train.

Both are pure functions of the labels, the patients and a seed: numpy's seeded Generator and sorted ids, never
Python's hash order, so the same inputs give the same splits in every process and on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from radstream.core.subsets import nested_levels

SPLITS = ("train", "val", "test", "unused")
"""Split names; "unused" holds what is left over when split sizes are given as counts."""


def assign_splits(
    labels: Sequence[str | None],
    patients: Sequence[str],
    *,
    seed: int,
    counts: tuple[int, int, int] | None = None,
    fractions: tuple[float, float, float] | None = None,
) -> list[str]:
    """Assign every item to train, val, test or unused, keeping each patient's images together.

    Patients are dealt to the splits in the order (class, size descending, random): each patient goes to the
    split furthest behind its share so far (a smooth weighted round-robin over images), so every class is
    spread over the splits in proportion and the totals end on the targets. A patient's class is the most
    common label among its images; unlabeled images are a group of their own.

    Args:
        labels: class name per item, None for unlabeled.
        patients: patient id per item; images of one patient always share a split.
        seed: seed of the random order among patients of the same class and size.
        counts: (train, val, test) sizes in images, e.g. the study's (8000, 2000, 2600); items beyond their
            sum are "unused". Met exactly when every patient has one image, otherwise within the largest
            patient's image count.
        fractions: (train, val, test) shares summing to 1; every item is used.

    Returns:
        "train", "val", "test" or "unused" per item.

    Raises:
        ValueError: not exactly one of counts / fractions, bad sizes, or labels and patients of different length.
    """
    n_items = len(labels)
    if len(patients) != n_items:
        raise ValueError(f"{n_items} labels but {len(patients)} patients")
    if any(p is None for p in patients):
        raise ValueError("every item needs a patient id (None found)")
    targets = _split_targets(n_items, counts, fractions)
    if n_items == 0:
        return []
    patient_of_item, patient_class, patient_size = _patients(labels, patients)
    random_key = np.random.default_rng(seed).permutation(len(patient_size))
    order = np.lexsort((random_key, -patient_size, patient_class))
    split_of_patient = np.empty(len(patient_size), dtype=np.int64)
    split_of_patient[order] = _deal(patient_size[order].tolist(), targets)
    names = np.array(SPLITS, dtype=object)
    return names[split_of_patient[patient_of_item]].tolist()


def label_fractions(
    labels: Sequence[str | None],
    splits: Sequence[str],
    *,
    fractions: Sequence[float] = (0.01, 0.1, 1.0),
    seed: int,
    patients: Sequence[str] | None = None,
) -> list[tuple[float, ...]]:
    """The nested label fractions of the training set that each item belongs to (the build's subset, subset 0
    of a study; ``radstream.core.subsets`` draws every other seed's the same way).

    The subset of fraction f holds round(f × labelled train images) images (at least one per class),
    stratified by class and drawn by whole patients (within the largest patient's image count of the
    quota); smaller subsets are contained in larger ones. Unlabeled train images belong to the 1.0 set only.

    Args:
        labels: class name per item, None for unlabeled.
        splits: split name per item, as from ``assign_splits``.
        fractions: the label fractions, each in (0, 1].
        seed: seed of the random choice of patients within each class.
        patients: patient id per item (None: every item its own patient).

    Returns:
        Per item the ascending tuple of fractions it belongs to; () for items outside train.

    Raises:
        ValueError: a fraction outside (0, 1], or labels, splits and patients of different length.
    """
    if len(splits) != len(labels) or (patients is not None and len(patients) != len(labels)):
        raise ValueError(f"{len(labels)} labels but {len(splits)} splits")
    levels = sorted(set(float(f) for f in fractions))
    if not levels or levels[0] <= 0.0 or levels[-1] > 1.0:
        raise ValueError(f"label fractions must lie in (0, 1], got {tuple(fractions)}")
    train = [i for i, split in enumerate(splits) if split == "train"]
    labelled = [i for i in train if labels[i] is not None]
    who = [patients[i] if patients is not None else f"item:{i}" for i in labelled]
    first_level = nested_levels([labels[i] for i in labelled], who, levels, seed)
    suffixes = [tuple(levels[i:]) for i in range(len(levels) + 1)]
    unlabeled_level = len(levels) - 1 if levels[-1] == 1.0 else len(levels)
    out: list[tuple[float, ...]] = [()] * len(labels)
    for i in train:
        out[i] = suffixes[unlabeled_level]
    for i, level in zip(labelled, first_level.tolist(), strict=True):
        out[i] = suffixes[level]
    return out


def _split_targets(
    n_items: int, counts: tuple[int, int, int] | None, fractions: tuple[float, float, float] | None
) -> list[int]:
    """Images per split (train, val, test, unused), summing to ``n_items``."""
    if (counts is None) == (fractions is None):
        raise ValueError("give exactly one of counts or fractions")
    if counts is not None:
        if len(counts) != 3 or any(int(c) != c or c < 0 for c in counts):
            raise ValueError(f"counts must be three non-negative integers (train, val, test), got {counts}")
        if sum(counts) > n_items:
            raise ValueError(f"counts {tuple(counts)} ask for {sum(counts)} images but there are {n_items}")
        return [int(c) for c in counts] + [n_items - int(sum(counts))]
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative shares summing to 1, got {fractions}")
    # Largest remainder: floors first, the leftover images to the largest fractional parts.
    exact = [f * n_items for f in fractions]
    targets = [math.floor(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda k: targets[k] - exact[k])
    for k in by_remainder[: n_items - sum(targets)]:
        targets[k] += 1
    return targets + [0]


def _patients(
    labels: Sequence[str | None], patients: Sequence[str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per item its patient index; per patient (sorted by id) its class index and image count."""
    _, patient_of_item = np.unique(np.array(patients, dtype=str), return_inverse=True)
    names = sorted({label for label in labels if label is not None})
    code = {name: k for k, name in enumerate(names)}
    unlabeled = len(names)
    class_of_item = np.fromiter((code.get(label, unlabeled) for label in labels), np.int64, len(labels))

    # The patient's class: its most common one, ties to the first in name order.
    n_codes = unlabeled + 1
    pairs, pair_count = np.unique(patient_of_item * n_codes + class_of_item, return_counts=True)
    pair_patient, pair_class = np.divmod(pairs, n_codes)
    best = np.lexsort((pair_class, -pair_count, pair_patient))
    first = np.flatnonzero(np.diff(pair_patient[best], prepend=-1))
    patient_class = pair_class[best][first]
    patient_size = np.bincount(patient_of_item)
    return patient_of_item, patient_class, patient_size


def _deal(sizes: list[int], targets: list[int]) -> list[int]:
    """Deal patients (image counts in dealing order) to splits by smooth weighted round-robin.

    Each split earns credit size × target per patient; the one with the most credit takes the patient and
    pays size × total. Credits are integers and sum to zero, so totals land on the targets exactly for
    single-image patients, and any run of patients is shared out in proportion up to a few patients.
    """
    total = sum(targets)
    credit = [0] * len(targets)
    splits = range(len(targets))
    out = []
    for size in sizes:
        for k in splits:
            credit[k] += size * targets[k]
        best = max(splits, key=credit.__getitem__)
        credit[best] -= size * total
        out.append(best)
    return out
