"""The labelled subset of a label fraction for one seed of a study, from a dataset's samples table.

Subset 0 is the build's (each sample's stored ``fractions``); subset k >= 1 is drawn again, the same way
(``radstream.core.subsets.nested_levels``: whole patients, stratified by class, nested across the dataset's fractions),
over the train split's labelled rows in key order. So the spread over seeds of a row covers which images carry
labels, not only a head's initialisation and batch order, and every model of seed k (probes, kNN, baselines,
fine-tuning) trains on subset k: the loader (``loader.label_subset``, by default the run's seed) and the probe
call the same function.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from radstream.core.subsets import nested_levels, subset_seed
from radstream.shards.layout import load_manifest, load_samples


def dataset_levels(manifest: dict) -> list[float]:
    """The dataset's label fractions, ascending (the build config's ``ingest.splits.label_fractions``)."""
    splits = manifest.get("config", {}).get("ingest", {}).get("splits", {})
    return sorted(float(f) for f in splits.get("label_fractions", [0.01, 0.1, 1.0]))


def stored_mask(fractions: pa.ChunkedArray | pa.Array, fraction: float) -> np.ndarray:
    """Rows whose stored list of label fractions contains ``fraction`` (the build's subset, subset 0)."""
    lists = fractions.combine_chunks() if isinstance(fractions, pa.ChunkedArray) else fractions
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    parents = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False)
    keep = np.zeros(len(lists), dtype=bool)
    if not len(flat):  # no row in any fraction (a list<null> column, perhaps)
        return keep
    keep[parents[np.isclose(flat, fraction, rtol=0, atol=1e-9)]] = True
    return keep


def drawn_mask(
    keys: np.ndarray,
    labels: np.ndarray,
    patients: np.ndarray,
    levels: list[float],
    fraction: float,
    subset: int,
) -> np.ndarray:
    """Rows (of one split's ``keys``, ``labels`` with -1 unlabeled, ``patients``) in subset ``subset`` >= 1
    of ``fraction``; unlabeled rows belong to the 1.0 fraction only, as in the build."""
    match = [i for i, level in enumerate(levels) if abs(level - fraction) < 1e-9]
    if not match:
        return np.zeros(len(keys), dtype=bool)
    keep = np.zeros(len(keys), dtype=bool)
    if abs(fraction - 1.0) < 1e-9:
        keep[:] = True
        return keep
    labelled = np.flatnonzero(labels >= 0)
    # fixed-width keys (UTF-8 bytes sort as their text) need no string per row
    text = keys[labelled] if keys.dtype.kind in "SU" else keys[labelled].astype(str)
    by_key = labelled[np.argsort(text, kind="stable")]
    level = nested_levels(labels[by_key], patients[by_key], levels, subset_seed(subset))
    keep[by_key[level <= match[0]]] = True
    return keep


def subset_mask(table: pa.Table, manifest: dict, fraction: float, subset: int) -> np.ndarray:
    """Rows of one train-split ``table`` (columns ``fractions``; for ``subset`` >= 1 also ``key``,
    ``label_index``, ``patient_id``) in subset ``subset`` of label fraction ``fraction``."""
    if subset == 0:
        return stored_mask(table["fractions"], fraction)
    column = table["patient_id"].to_numpy(zero_copy_only=False)
    return drawn_mask(
        table["key"].to_numpy(zero_copy_only=False),
        table["label_index"].to_numpy().astype(np.int64),
        np.asarray(column, dtype=object),
        dataset_levels(manifest),
        fraction,
        subset,
    )


def subset_keys(root: str | Path, fraction: float, subset: int) -> set[str]:
    """The train keys of subset ``subset`` of ``fraction`` of the dataset at ``root`` (local)."""
    table = load_samples(root, "train", columns=["key", "label_index", "patient_id", "fractions"])
    keep = subset_mask(table, load_manifest(Path(root)), fraction, subset)
    return set(table["key"].to_numpy(zero_copy_only=False)[keep].tolist())
