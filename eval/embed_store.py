"""The embedding store: frozen-encoder embeddings per split and aggregation, in zarr 3.

Layout of ``EMB.zarr``::

    attrs      format_version, checkpoint, checkpoint_config, shards, class_names, label_fractions,
               aggregations, dims {aggregation: width}, embed_dim, pool_grid
    <split>/   attrs: rows, chunk_rows, complete
      keys        str   [N]          the split's samples in samples-table order: row i = i-th sample of the split
      labels      int64 [N]          class index, -1 = unlabeled
      fractions   bool  [N, F]       fractions[i, j]: sample i is in label fraction attrs["label_fractions"][j]
      cls, mean   f16   [N, D]
      flattened   f16   [N, gh*gw*D]
      chunk_done  bool  [n_chunks]   one zarr chunk per flag, so each flag has one writer
    _staging/<split>/rank-<r>-of-<W>/    attrs: plan, batches_done, rows_done, finished
      rows int64 [n], cls, mean, flattened      one rank's rows in the order its loader gave them

Why two phases: a zarr chunk is written whole (read, modify, write), so two ranks writing different rows of
one chunk would lose each other's rows. Ranks therefore first append their embeddings to their own staging
arrays (phase 1, resumable per flushed chunk), then rank r assembles the final chunks ``r, r+W, …`` from all
staging arrays (phase 2, resumable per chunk). Each rank writes a disjoint set of final rows; no chunk has two
writers. The assembly also proves that the ranks together covered every row exactly once.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr

logger = logging.getLogger(__name__)

FORMAT_VERSION = "1.0"
AGGREGATIONS = ("cls", "mean", "flattened")
_STAGING = "_staging"


@dataclass(frozen=True)
class SplitRows:
    """The rows of one split, in samples-table order.

    Attributes:
        keys: sample keys.
        labels: int64 [N] class indices, -1 unlabeled.
        fractions: bool [N, F], membership in the store's label fractions.
    """

    keys: list[str]
    labels: np.ndarray
    fractions: np.ndarray


@dataclass(frozen=True)
class EmbeddingSplit:
    """One split read back: float32 features per aggregation, aligned with keys, labels and fractions."""

    keys: list[str]
    labels: np.ndarray
    fractions: np.ndarray
    features: dict[str, np.ndarray]


def create_store(path: str | Path, meta: Mapping[str, Any]) -> zarr.Group:
    """Open the store for writing, creating it with ``meta`` as its attrs (main process only).

    An existing store is reused (resume) only when it came from the same checkpoint with the same
    aggregations and widths; anything else is refused rather than mixing two encoders in one store.

    Raises:
        ValueError: the store at ``path`` holds embeddings of a different checkpoint or layout.
    """
    root = zarr.open_group(str(path), mode="a")
    if "format_version" not in root.attrs:
        root.attrs.update({"format_version": FORMAT_VERSION, **meta})
        return root
    for key in ("checkpoint", "aggregations", "dims", "label_fractions"):
        if root.attrs.get(key) != meta.get(key):
            raise ValueError(
                f"{path}: existing embedding store has {key}={root.attrs.get(key)!r}, this run {meta.get(key)!r};"
                " use a new --out or delete it"
            )
    return root


def split_complete(path: str | Path, split: str) -> bool:
    """True when ``split`` was fully written (assembled and verified) into the store."""
    try:
        root = zarr.open_group(str(path), mode="r")
    except FileNotFoundError:
        return False
    return split in root and bool(root[split].attrs.get("complete", False))


def prepare_split(path: str | Path, split: str, rows: SplitRows, chunk_rows: int, world_size: int) -> None:
    """Preallocate the split's arrays and write its keys, labels and fractions (main process only).

    Arrays already there are kept (resume). Staging left by a run with another world size is dropped: its
    rows were assigned under a different schedule, so those ranks start over.
    """
    root = zarr.open_group(str(path), mode="a")
    dims = root.attrs["dims"]
    n = len(rows.keys)
    group = root.require_group(split)
    if "rows" not in group.attrs:  # set last: a crash mid-way leaves no marker, and the arrays are remade
        arrays = {
            "keys": (np.asarray(rows.keys), str),
            "labels": (rows.labels, "int64"),
            "fractions": (rows.fractions, bool),
        }
        for name, (values, dtype) in arrays.items():
            chunks = (chunk_rows, *values.shape[1:])
            group.create_array(name, shape=values.shape, dtype=dtype, chunks=chunks, overwrite=True)[:] = (
                values
            )
        for name, dim in dims.items():
            group.create_array(
                name, shape=(n, dim), dtype="float16", chunks=(chunk_rows, dim), fill_value=0, overwrite=True
            )
        n_chunks = -(-n // chunk_rows)
        group.create_array(
            "chunk_done", shape=(n_chunks,), dtype=bool, chunks=(1,), fill_value=False, overwrite=True
        )
        group.attrs.update({"rows": n, "chunk_rows": chunk_rows, "complete": False})
    elif list(group["keys"][:]) != list(rows.keys):
        raise ValueError(f"{path}/{split}: stored keys differ from the shard dataset's samples table")
    staging = root.require_group(_STAGING).require_group(split)
    for name in list(staging.group_keys()):
        if not name.endswith(f"-of-{world_size}"):
            logger.info("embed %s: dropping staging %s from a run with another world size", split, name)
            del staging[name]


class StagingWriter:
    """One rank's phase-1 writer: buffers (row, embeddings) and appends whole chunks to its own arrays.

    Resumable: ``batches_done`` says how many loader batches are already stored; a rerun skips them. The
    ``plan`` (loader length, batch size, …) must match the stored one, otherwise the staging restarts.
    """

    def __init__(self, path: str | Path, split: str, rank: int, world_size: int, plan: Mapping[str, Any]):
        root = zarr.open_group(str(path), mode="a")
        self.chunk_rows = int(root[split].attrs["chunk_rows"])
        dims = root.attrs["dims"]
        parent = root.require_group(_STAGING).require_group(split)
        name = f"rank-{rank}-of-{world_size}"
        if name in parent and parent[name].attrs.get("plan") != dict(plan):
            logger.warning(
                "embed %s: staging %s was made with another loader plan; starting over", split, name
            )
            del parent[name]
        if name not in parent:
            group = parent.create_group(name)
            group.create_array("rows", shape=(0,), dtype="int64", chunks=(self.chunk_rows,))
            for agg, dim in dims.items():
                group.create_array(agg, shape=(0, dim), dtype="float16", chunks=(self.chunk_rows, dim))
            group.attrs.update({"plan": dict(plan), "batches_done": 0, "rows_done": 0, "finished": False})
        self.group = parent[name]
        self.aggregations = list(dims)
        self.batches_done = int(self.group.attrs["batches_done"])
        self.finished = bool(self.group.attrs["finished"])
        self._truncate(int(self.group.attrs["rows_done"]))
        self._rows: list[np.ndarray] = []
        self._feats: dict[str, list[np.ndarray]] = {a: [] for a in self.aggregations}

    def _truncate(self, n: int) -> None:
        """Drop rows appended after the last recorded flush (a crash between append and attrs update)."""
        for name in ["rows", *self.aggregations]:
            arr = self.group[name]
            if arr.shape[0] != n:
                arr.resize((n, *arr.shape[1:]))

    def add(self, rows: np.ndarray, feats: Mapping[str, np.ndarray]) -> None:
        """Buffer one batch's valid rows (``rows`` int [b]) and their embeddings (``feats[agg]`` [b, dim])."""
        self._rows.append(np.asarray(rows, dtype=np.int64))
        for agg in self.aggregations:
            self._feats[agg].append(np.asarray(feats[agg], dtype=np.float16))
        self.batches_done += 1
        if sum(len(r) for r in self._rows) >= self.chunk_rows:
            self.flush()

    def skip(self) -> None:
        """Count a batch that holds no rows to store (only padding repeats)."""
        self.batches_done += 1

    def flush(self, finished: bool = False) -> None:
        """Append the buffer, then record progress (arrays first, so the attrs never claim unwritten rows)."""
        if self._rows:
            self.group["rows"].append(np.concatenate(self._rows))
            for agg in self.aggregations:
                self.group[agg].append(np.concatenate(self._feats[agg]), axis=0)
        self._rows = []
        self._feats = {a: [] for a in self.aggregations}
        self.group.attrs.update(
            {
                "batches_done": self.batches_done,
                "rows_done": self.group["rows"].shape[0],
                "finished": finished,
            }
        )
        self.finished = finished


def _staging_parts(root: zarr.Group, split: str, world_size: int) -> list[zarr.Group]:
    parent = root[_STAGING][split]
    parts = [parent[f"rank-{r}-of-{world_size}"] for r in range(world_size)]
    unfinished = [r for r, g in enumerate(parts) if not g.attrs.get("finished")]
    if unfinished:
        raise RuntimeError(f"embed {split}: ranks {unfinished} have not finished embedding")
    return parts


def _row_sources(parts: Sequence[zarr.Group], n: int, split: str, keys: zarr.Array) -> np.ndarray:
    """[n, 2] (part, position) of every final row; every row must come from exactly one staging entry."""
    rows = [np.asarray(p["rows"][:]) for p in parts]
    all_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    counts = np.bincount(all_rows, minlength=n)
    if len(counts) > n or (counts > 1).any():
        raise RuntimeError(
            f"embed {split}: {int((counts > 1).sum())} rows were embedded by more than one rank"
        )
    if (counts == 0).any():
        missing = np.flatnonzero(counts == 0)
        raise RuntimeError(
            f"embed {split}: {len(missing)} rows were never embedded (the loader skipped them), "
            f"e.g. key {keys[int(missing[0])]!r}"
        )
    source = np.empty((n, 2), dtype=np.int64)
    for part, r in enumerate(rows):
        source[r, 0] = part
        source[r, 1] = np.arange(len(r))
    return source


def assemble_split(path: str | Path, split: str, rank: int, world_size: int) -> int:
    """Phase 2 for one rank: fill the final chunks ``rank, rank + W, …`` from every rank's staging.

    Returns:
        The number of chunks this rank wrote (finished chunks of an earlier run are skipped).

    Raises:
        RuntimeError: a rank has not finished, or the ranks' rows do not cover the split exactly once.
    """
    root = zarr.open_group(str(path), mode="a")
    group = root[split]
    n, chunk_rows = int(group.attrs["rows"]), int(group.attrs["chunk_rows"])
    done = group["chunk_done"]
    todo = [c for c in range(rank, done.shape[0], world_size) if not done[c]]
    if not todo:
        return 0
    parts = _staging_parts(root, split, world_size)
    source = _row_sources(parts, n, split, group["keys"])
    for c in todo:
        lo, hi = c * chunk_rows, min(n, (c + 1) * chunk_rows)
        for agg in root.attrs["dims"]:
            block = np.empty((hi - lo, group[agg].shape[1]), dtype=np.float16)
            for part, g in enumerate(parts):
                sel = np.flatnonzero(source[lo:hi, 0] == part)
                if len(sel):
                    block[sel] = g[agg].oindex[source[lo + sel, 1], :]
            group[agg][lo:hi] = block
        done[c] = True
    return len(todo)


def finish_split(path: str | Path, split: str) -> None:
    """Mark the split complete and drop its staging (main process, after every rank assembled)."""
    root = zarr.open_group(str(path), mode="a")
    group = root[split]
    if not bool(np.all(group["chunk_done"][:])):
        raise RuntimeError(f"embed {split}: not every chunk was assembled")
    group.attrs["complete"] = True
    staging = root.get(_STAGING)
    if staging is not None and split in staging:
        del staging[split]


def read_attrs(path: str | Path) -> dict[str, Any]:
    """The store's attrs (checkpoint, class names, label fractions, dims, …)."""
    return dict(zarr.open_group(str(path), mode="r").attrs)


def read_split(path: str | Path, split: str, aggregations: Sequence[str] | None = None) -> EmbeddingSplit:
    """Read one complete split into memory, features as float32.

    Raises:
        FileNotFoundError: no store at ``path``.
        ValueError: the split is missing or unfinished, or an aggregation is not stored.
    """
    if not Path(path).exists():
        raise FileNotFoundError(f"{path}: no embedding store (run radstream.eval.embed first)")
    root = zarr.open_group(str(path), mode="r")
    if split not in root or not root[split].attrs.get("complete"):
        raise ValueError(
            f"{path}: split {split!r} is missing or unfinished (rerun radstream.eval.embed to resume)"
        )
    group = root[split]
    names = list(root.attrs["dims"]) if aggregations is None else list(aggregations)
    unknown = [a for a in names if a not in root.attrs["dims"]]
    if unknown:
        raise ValueError(f"{path}: aggregations {unknown} not stored (have {list(root.attrs['dims'])})")
    return EmbeddingSplit(
        keys=[str(k) for k in group["keys"][:]],
        labels=np.asarray(group["labels"][:], dtype=np.int64),
        fractions=np.asarray(group["fractions"][:], dtype=bool),
        features={a: np.asarray(group[a][:], dtype=np.float32) for a in names},
    )
