from __future__ import annotations

import time
from collections import Counter, defaultdict

import numpy as np
import pytest

from radstream.ingest.splits import SPLITS, assign_splits, label_fractions

# The reference study: IRMA training list by region, whole body dropped → 12,674 images in 8 classes.
IRMA_CLASSES = {
    "cranium": 1246,
    "spine": 1475,
    "upper_extremity": 2041,
    "chest": 4829,
    "breast": 339,
    "abdomen": 307,
    "pelvis": 284,
    "lower_extremity": 2153,
}
STUDY_COUNTS = (8000, 2000, 2600)


def irma_labels() -> list[str]:
    return [name for name, count in IRMA_CLASSES.items() for _ in range(count)]


def multi_image_patients(n_patients: int, seed: int, max_images: int = 6, unlabeled: float = 0.1):
    """Patients with 1..max_images images, mostly of one class; some images unlabeled."""
    rng = np.random.default_rng(seed)
    classes = ["a", "b", "c", "d", "e"]
    labels: list[str | None] = []
    patients: list[str] = []
    for p in range(n_patients):
        main = rng.choice(classes, p=[0.4, 0.3, 0.15, 0.1, 0.05])
        for _ in range(rng.integers(1, max_images + 1)):
            other = rng.random() < 0.1
            label = None if rng.random() < unlabeled else (rng.choice(classes) if other else main)
            labels.append(None if label is None else str(label))
            patients.append(f"P{p:05d}")
    order = rng.permutation(len(labels))  # items of one patient need not be adjacent
    return [labels[i] for i in order], [patients[i] for i in order]


def totals(splits: list[str]) -> dict[str, int]:
    count = Counter(splits)
    return {name: count[name] for name in SPLITS}


def test_no_patient_in_two_splits():
    for seed in range(5):
        labels, patients = multi_image_patients(800, seed)
        for kwargs in ({"counts": (1500, 400, 300)}, {"fractions": (0.7, 0.15, 0.15)}):
            splits = assign_splits(labels, patients, seed=seed, **kwargs)
            split_of = defaultdict(set)
            for patient, split in zip(patients, splits, strict=True):
                split_of[patient].add(split)
            assert all(len(s) == 1 for s in split_of.values())


def test_counts_within_the_largest_patient():
    for seed in range(20):
        labels, patients = multi_image_patients(300, seed, max_images=int(2 + seed % 9))
        largest = max(Counter(patients).values())
        n = len(labels)
        counts = (n // 2, n // 5, n // 6)
        got = totals(assign_splits(labels, patients, seed=seed, counts=counts))
        for name, target in zip(SPLITS, (*counts, n - sum(counts)), strict=True):
            assert abs(got[name] - target) <= largest, (seed, name, got, counts)


def test_exact_counts_for_single_image_patients():
    rng = np.random.default_rng(3)
    labels = [None if x == "u" else str(x) for x in rng.choice(list("abcdu"), size=1003)]
    patients = [f"id{i}" for i in range(len(labels))]
    for counts in [(600, 200, 150), (1003, 0, 0), (0, 3, 1000), (1, 1, 1)]:
        got = totals(assign_splits(labels, patients, seed=1, counts=counts))
        assert got == dict(zip(SPLITS, (*counts, 1003 - sum(counts)), strict=True))


def test_stratification_keeps_class_shares():
    labels, patients = multi_image_patients(1700, seed=11, max_images=4)
    n = len(labels)
    assert n > 4000
    splits = assign_splits(labels, patients, seed=5, fractions=(0.6, 0.2, 0.2))
    overall = Counter(labels)
    for split in ("train", "val", "test"):
        in_split = [label for label, s in zip(labels, splits, strict=True) if s == split]
        share = Counter(in_split)
        for label, count in overall.items():
            assert abs(share[label] / len(in_split) - count / n) < 0.02, (split, label)


def test_stratification_on_5000_single_images():
    rng = np.random.default_rng(0)
    labels = [
        str(x)
        for x in rng.choice(list("abcdefgh"), size=5000, p=[0.38, 0.17, 0.16, 0.12, 0.1, 0.03, 0.02, 0.02])
    ]
    patients = [f"p{i}" for i in range(5000)]
    splits = assign_splits(labels, patients, seed=0, fractions=(0.7, 0.1, 0.2))
    overall = Counter(labels)
    for split in ("train", "val", "test"):
        share = Counter(label for label, s in zip(labels, splits, strict=True) if s == split)
        size = sum(share.values())
        chi2 = sum((share[c] - size * overall[c] / 5000) ** 2 / (size * overall[c] / 5000) for c in overall)
        assert chi2 < 2.0, (split, chi2)  # a random split would give ~7 (8 classes); dealing gives ~0
        assert all(abs(share[c] / size - overall[c] / 5000) < 0.01 for c in overall)


def test_deterministic_per_seed_and_different_across_seeds():
    labels, patients = multi_image_patients(500, seed=2)
    first = assign_splits(labels, patients, seed=7, fractions=(0.8, 0.1, 0.1))
    assert assign_splits(list(labels), list(patients), seed=7, fractions=(0.8, 0.1, 0.1)) == first
    assert assign_splits(labels, patients, seed=8, fractions=(0.8, 0.1, 0.1)) != first
    fractions = label_fractions(labels, first, seed=7, fractions=(0.05, 0.5, 1.0))
    assert label_fractions(labels, first, seed=7, fractions=(0.05, 0.5, 1.0)) == fractions
    assert label_fractions(labels, first, seed=8, fractions=(0.05, 0.5, 1.0)) != fractions


def test_fractions_mode_uses_every_item():
    labels, patients = multi_image_patients(600, seed=4, max_images=3)
    n = len(labels)
    got = totals(assign_splits(labels, patients, seed=0, fractions=(0.7, 0.2, 0.1)))
    assert got["unused"] == 0 and sum(got.values()) == n
    largest = max(Counter(patients).values())
    for name, share in zip(SPLITS[:3], (0.7, 0.2, 0.1), strict=True):
        assert abs(got[name] - share * n) <= largest + 1
    single = [f"p{i}" for i in range(10)]
    assert totals(assign_splits(["a"] * 10, single, seed=0, fractions=(1 / 3, 1 / 3, 1 / 3))) == {
        "train": 4,
        "val": 3,
        "test": 3,
        "unused": 0,
    }


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of counts or fractions"),
        ({"counts": (1, 1, 1), "fractions": (0.5, 0.25, 0.25)}, "exactly one of counts or fractions"),
        ({"counts": (5, 5, 1)}, r"ask for 11 images but there are 10"),
        ({"counts": (5, -1, 1)}, "non-negative integers"),
        ({"counts": (5, 1.5, 1)}, "non-negative integers"),
        ({"counts": (5, 1)}, "non-negative integers"),
        ({"fractions": (0.5, 0.25, 0.2)}, "summing to 1"),
        ({"fractions": (1.2, -0.1, -0.1)}, "summing to 1"),
    ],
)
def test_bad_sizes(kwargs, message):
    with pytest.raises(ValueError, match=message):
        assign_splits(["a"] * 10, [str(i) for i in range(10)], seed=0, **kwargs)


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 labels but 2 patients"):
        assign_splits(["a", "b", "c"], ["1", "2"], seed=0, fractions=(1, 0, 0))
    with pytest.raises(ValueError, match="patient id"):
        assign_splits(["a", "b"], ["1", None], seed=0, fractions=(1, 0, 0))  # type: ignore[list-item]
    assert assign_splits([], [], seed=0, counts=(0, 0, 0)) == []
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\]"):
        label_fractions(["a"], ["train"], seed=0, fractions=(0.0, 1.0))
    with pytest.raises(ValueError, match="2 labels but 1 splits"):
        label_fractions(["a", "b"], ["train"], seed=0)


def test_the_study_numbers():
    labels = irma_labels()
    assert len(labels) == 12_674
    patients = [f"{i:05d}" for i in range(len(labels))]
    splits = assign_splits(labels, patients, seed=0, counts=STUDY_COUNTS)
    assert totals(splits) == {"train": 8000, "val": 2000, "test": 2600, "unused": 74}
    for split in ("train", "val", "test"):
        share = Counter(label for label, s in zip(labels, splits, strict=True) if s == split)
        assert set(share) == set(IRMA_CLASSES)
        for name, count in IRMA_CLASSES.items():
            assert abs(share[name] / sum(share.values()) - count / 12_674) < 0.002

    fractions = label_fractions(labels, splits, seed=0)
    sets = {f: {i for i, fs in enumerate(fractions) if f in fs} for f in (0.01, 0.1, 1.0)}
    assert [len(sets[f]) for f in (0.01, 0.1, 1.0)] == [80, 800, 8000]
    assert sets[0.01] < sets[0.1] < sets[1.0]
    assert sets[1.0] == {i for i, s in enumerate(splits) if s == "train"}
    assert all(fs == () for fs, s in zip(fractions, splits, strict=True) if s != "train")
    one_percent = Counter(labels[i] for i in sets[0.01])
    assert set(one_percent) == set(IRMA_CLASSES) and min(one_percent.values()) >= 1
    assert one_percent.most_common(1)[0][0] == "chest"


def test_label_fractions_nested_and_stratified():
    rng = np.random.default_rng(9)
    labels = [None if x == "u" else str(x) for x in rng.choice(list("aaaaaaabbbbcdu"), size=3000)]
    splits = [str(s) for s in rng.choice(["train", "val", "test"], size=3000, p=[0.8, 0.1, 0.1])]
    levels = (0.02, 0.05, 0.3, 0.7, 1.0)
    fractions = label_fractions(labels, splits, fractions=(0.3, 1.0, 0.02, 0.7, 0.05), seed=1)
    train_labelled = [i for i, s in enumerate(splits) if s == "train" and labels[i] is not None]
    by_class = Counter(labels[i] for i in train_labelled)
    for i, fs in enumerate(fractions):
        if splits[i] != "train":
            assert fs == ()
        elif labels[i] is None:
            assert fs == (1.0,)
        else:
            assert fs == levels[levels.index(fs[0]) :]  # nested: ascending suffix of the levels
    for f in levels[:-1]:
        chosen = Counter(labels[i] for i in train_labelled if f in fractions[i])
        assert sum(chosen.values()) == max(round(f * len(train_labelled)), len(by_class))
        for name, count in by_class.items():
            assert chosen[name] >= 1
            assert abs(chosen[name] - f * count) <= 1


def test_label_fractions_at_least_one_per_class():
    labels = ["big"] * 500 + ["rare1", "rare2", "rare3"]
    fractions = label_fractions(labels, ["train"] * len(labels), fractions=(0.001, 0.5), seed=0)
    smallest = Counter(label for label, fs in zip(labels, fractions, strict=True) if 0.001 in fs)
    assert smallest == {"big": 1, "rare1": 1, "rare2": 1, "rare3": 1}  # round(0.5) = 1 < 4 classes
    assert all(
        fs == (0.001, 0.5) for label, fs in zip(labels, fractions, strict=True) if label.startswith("rare")
    )
    no_full = label_fractions([None, "a"], ["train", "train"], fractions=(0.5,), seed=0)
    assert no_full == [(), (0.5,)]


def test_scales_to_a_large_archive():
    rng = np.random.default_rng(0)
    n = 700_000
    labels = [str(x) for x in rng.choice(list(IRMA_CLASSES), size=n)]
    patients = [f"P{p:07d}" for p in rng.integers(0, 250_000, size=n)]
    start = time.perf_counter()
    splits = assign_splits(labels, patients, seed=0, fractions=(0.8, 0.1, 0.1))
    label_fractions(labels, splits, seed=0)
    assert time.perf_counter() - start < 20  # ~1 s on one core
