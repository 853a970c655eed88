"""Nested, patient-grouped, class-stratified labelled subsets of a training split: the study's label fractions.

One function draws them for the build (``ingest.splits.label_fractions``: subset 0, stored with every sample)
and for every other seed of a study (``radstream.shards.subsets``: subset k, drawn again from the samples table), so
"the 1% of seed k" means the same kind of draw everywhere. A pure function of the labels, the patients and a
seed: numpy's seeded Generator over the items in the order given, never Python's hash order.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np


def subset_seed(subset: int) -> int:
    """The draw's seed of study subset ``subset`` >= 1 (subset 0 is the build's, drawn with the build seed).

    Independent of the build seed on purpose: a subset is re-drawn from the samples table alone, by any
    process that reads it (loader, probe, kNN), and gets the same images."""
    return int(np.random.SeedSequence([0x1AB5E7, subset]).generate_state(1)[0])


def nested_levels(
    labels: Sequence[Hashable], patients: Sequence[Hashable], levels: Sequence[float], seed: int
) -> np.ndarray:
    """Per labelled item, the index of the smallest of ``levels`` (ascending) whose subset holds it.

    Subsets are drawn by patient: a patient's class is its most common label (ties: the first in sorted
    order), patients are ranked at random within their class, and a class's patients are taken in that order
    while the images taken so far are fewer than the class's quota, so all of a patient's images are in or
    out together. Quotas per class are round(f x images) in all (at least one image per class) shared out by
    Webster's divisor method, whose seats come in one fixed order, so every subset holds the smaller ones.
    With one image per patient this is an image-level stratified draw with exact quotas.

    Args:
        labels: class of every labelled item (any hashable; unlabeled items are the caller's).
        patients: patient id of every item.
        levels: ascending fractions in (0, 1].
        seed: the draw's seed.

    Returns:
        int64 [N]: index into ``levels`` (``len(levels)``: in none).
    """
    if len(labels) != len(patients):
        raise ValueError(f"{len(labels)} labels but {len(patients)} patients")
    if len(labels) == 0:
        return np.zeros(0, dtype=np.int64)
    class_of = _codes_in_text_order(labels)
    patients = np.asarray(patients)
    if patients.dtype.kind not in "SU":  # bytes (UTF-8) and str arrays are compared as they are
        patients = patients.astype(str)
    _, first, patient_of = np.unique(patients, return_index=True, return_inverse=True)
    # patients in the order they first appear: with one image each, the items' own order
    order = np.argsort(first, kind="stable")
    renumber = np.empty_like(order)
    renumber[order] = np.arange(len(order))
    patient_of = renumber[patient_of.reshape(-1)]
    n_classes, n_patients = int(class_of.max()) + 1, len(order)
    counts = np.zeros((n_patients, n_classes), dtype=np.int64)
    np.add.at(counts, (patient_of, class_of.reshape(-1)), 1)
    patient_class = counts.argmax(axis=1)  # ties: the smallest class index = the first in sorted order
    patient_size = counts.sum(axis=1)
    per_class = np.bincount(patient_class, weights=patient_size, minlength=n_classes).astype(np.int64)
    alloc = _nested_allocations(per_class, list(levels))
    random_order = np.random.default_rng(seed).permutation(n_patients)
    by_class = random_order[np.argsort(patient_class[random_order], kind="stable")]
    before = np.empty(n_patients, dtype=np.int64)  # images of the patient's class ranked before it
    cumulative = np.cumsum(patient_size[by_class]) - patient_size[by_class]
    class_start = np.concatenate(([0], np.cumsum(per_class)[:-1]))
    before[by_class] = cumulative - class_start[patient_class[by_class]]
    level = np.full(n_patients, len(levels), dtype=np.int64)
    for i in reversed(range(len(levels))):
        level[before < alloc[i][patient_class]] = i
    return level[patient_of]


def _codes_in_text_order(labels: Sequence[Hashable]) -> np.ndarray:
    """Each label's class number, classes numbered in the sorted order of their text (``"10"`` before
    ``"2"``); an integer array is coded without a string per item (10M labels: 10M strings otherwise)."""
    values = np.asarray(labels)
    if values.dtype.kind in "iu":
        distinct, codes = np.unique(values, return_inverse=True)
        rank = np.empty(len(distinct), np.int64)
        rank[np.argsort(distinct.astype(str), kind="stable")] = np.arange(len(distinct))
        return rank[codes.reshape(-1)]
    return np.unique(values.astype(str), return_inverse=True)[1].reshape(-1)


def _nested_allocations(per_class: np.ndarray, levels: list[float]) -> list[np.ndarray]:
    """Images per class for each fraction: one per class, the rest by Webster's divisor method.

    A divisor method hands out seats in one fixed priority order, so a larger total only adds seats: the
    allocations are nested. The total is round(f × n) but at least one image per class.
    """
    n_labelled = int(per_class.sum())
    n_classes = len(per_class)
    extra = np.maximum(per_class - 1, 0)  # seats beyond the first one of every class
    seat_class = np.repeat(np.arange(n_classes), extra)
    held = 1 + np.arange(len(seat_class)) - np.repeat(np.cumsum(extra) - extra, extra)
    priority = per_class[seat_class] / (held + 0.5)
    seat_order = seat_class[np.argsort(-priority, kind="stable")]
    alloc = []
    for f in levels:
        total = min(max(math.floor(f * n_labelled + 0.5), n_classes), n_labelled)
        alloc.append(1 + np.bincount(seat_order[: max(total - n_classes, 0)], minlength=n_classes))
    return alloc
