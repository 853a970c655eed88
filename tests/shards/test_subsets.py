"""Every seed of a study draws its own labelled subset: patient-grouped, class-stratified, nested across the
fractions, and the same images for every model of that seed (the loader of a trained model, the probe)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from radstream.core.subsets import nested_levels
from radstream.eval.probe import make_groups
from radstream.eval.probe_config import ProbeConfig, ProbeData
from radstream.shards.layout import load_samples
from radstream.shards.loader_data import load_split
from radstream.shards.subsets import subset_keys


def split_keys(root, fraction: float, subset: int) -> set[str]:
    return {k for b in load_split(root, "train", fraction, subset).bins.values() for k in b.keys.tolist()}


def test_two_seeds_at_the_smallest_fraction_label_different_images(tiny_shards) -> None:
    first, second = subset_keys(tiny_shards, 0.01, 0), subset_keys(tiny_shards, 0.01, 1)
    assert first == split_keys(tiny_shards, 0.01, 0)  # subset 0 is the build's
    assert second == split_keys(tiny_shards, 0.01, 1)
    assert first and second and first != second
    assert subset_keys(tiny_shards, 0.01, 1) <= subset_keys(tiny_shards, 0.1, 1)  # nested within a seed
    table = load_samples(tiny_shards, "train", columns=["key", "label_index", "patient_id"])
    label_of = dict(zip(table["key"].to_pylist(), table["label_index"].to_pylist(), strict=True))
    # the same quota per class; a patient's images come whole, so a draw may pass its quota by up to one
    # patient's images less one (the pseudonyms, and so who is drawn, follow the test run's privacy key)
    slack = max(Counter(table["patient_id"].to_pylist()).values()) - 1
    counts = [Counter(label_of[k] for k in keys) for keys in (first, second)]
    for label in set(label_of.values()) - {-1}:
        assert (
            min(counts[0][label], counts[1][label]) >= 1 and abs(counts[0][label] - counts[1][label]) <= slack
        )


def test_the_probe_of_seed_k_trains_on_the_loaders_subset_k(tiny_shards) -> None:
    table = load_samples(tiny_shards, "train", columns=["key", "label_index", "patient_id"])
    labels = table["label_index"].to_numpy()
    keys = np.asarray(table["key"].to_pylist(), dtype=object)[labels >= 0]
    patients = np.asarray(table["patient_id"].to_pylist(), dtype=object)[labels >= 0]
    fractions = np.zeros((len(keys), 3), dtype=bool)
    fractions[:, 2] = True
    fractions[[k in subset_keys(tiny_shards, 0.01, 0) for k in keys], 0] = True
    data = ProbeData({}, {"train": torch.from_numpy(labels[labels >= 0])}, fractions,
                     [0.01, 0.1, 1.0], ["a"], keys, patients)  # fmt: skip
    cfg = ProbeConfig(embeddings="x", out="y", label_fractions=[0.01], seeds=[0, 1, 2], device="cpu")
    for group in make_groups(data, cfg):
        assert set(keys[group.rows]) == split_keys(tiny_shards, 0.01, group.seed)


def test_a_patient_is_in_or_out_whole_and_classes_keep_their_quota() -> None:
    labels = ["a"] * 40 + ["b"] * 20
    patients = [f"a{i // 4}" for i in range(40)] + [f"b{i // 2}" for i in range(20)]
    for seed in range(5):
        level = nested_levels(labels, patients, [0.1, 0.5, 1.0], seed)
        for p in set(patients):
            assert len({int(v) for v, q in zip(level, patients, strict=True) if q == p}) == 1
        small = [lab for lab, v in zip(labels, level, strict=True) if v == 0]
        assert small.count("a") >= 1 and small.count("b") >= 1
        assert (level <= 1).sum() >= (level == 0).sum()  # nested: 10% inside 50%
    draws = {tuple(nested_levels(labels, patients, [0.1, 1.0], seed)) for seed in range(5)}
    assert len(draws) > 1  # the seed changes which patients carry labels
