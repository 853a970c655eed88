"""The loader's view of a shard dataset: one split's samples per bin, and reading their bytes by offset.

``load_split`` turns the manifest and ``samples.parquet`` into flat numpy arrays per bin (keys, shard, byte
range, label, foreground box) in the dataset's stored order, which is the order the schedule's indices refer
to. They pickle cheaply into DataLoader workers. ``ShardFiles`` reads an image member with one ``pread``.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc

from shards.layout import DatasetError, inside, load_manifest, load_samples, shard_entries
from shards.store import ShardStore
from shards.subsets import subset_mask

_MAX_OPEN_SHARDS = 64  # file descriptors kept open per process


@dataclass(frozen=True)
class BinSamples:
    """The samples of one bin of a split, in stored order, shard after shard (the schedule's indices point
    into these arrays)."""

    name: str
    height: int
    width: int
    keys: np.ndarray
    """object [N], sample keys."""
    shard: np.ndarray
    """int32 [N], index into ``SplitSamples.shards``."""
    offset: np.ndarray
    """int64 [N], byte offset of the image member in its tar."""
    size: np.ndarray
    """int64 [N], byte size of the image member."""
    label: np.ndarray
    """int64 [N], class index, -1 unlabeled."""
    foreground: np.ndarray
    """int64 [N, 4], foreground box (y0, x0, y1, x1) in bin pixels."""

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def shard_counts(self) -> tuple[int, ...]:
        """Samples per shard, in stored order (the rows are grouped by shard)."""
        starts = np.flatnonzero(np.diff(self.shard, prepend=-1))
        return tuple(np.diff(np.append(starts, len(self.shard))).tolist())


@dataclass(frozen=True)
class SplitSamples:
    """What a loader needs to know about one split of a shard dataset."""

    split: str
    codec: str
    """Codec name from the manifest (``shards.codecs``)."""
    shards: tuple[str, ...]
    """Absolute tar paths, indexed by ``BinSamples.shard``."""
    bins: dict[str, BinSamples]
    """Bins with at least one sample, by name, sorted."""
    class_names: tuple[str, ...]

    @property
    def counts(self) -> dict[str, int]:
        """Samples per bin name."""
        return {name: len(b) for name, b in self.bins.items()}

    @property
    def shard_counts(self) -> dict[str, tuple[int, ...]]:
        """Per bin name, samples per shard in stored order (what the schedule's shuffle blocks group)."""
        return {name: b.shard_counts for name, b in self.bins.items()}


def _boxes(column, root: Path) -> np.ndarray:
    """The foreground_bin list column as int64 [N, 4] (without a Python object per row)."""
    lists = column.combine_chunks()
    if (pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False) != 4).any():
        raise ValueError(f"{root}: samples table has a foreground_bin that is not 4 numbers")
    return lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 4)


def load_split(
    root: str | os.PathLike[str], split: str, label_fraction: float | None = None, label_subset: int = 0
) -> SplitSamples:
    """Read the manifest and the split's rows of the samples table.

    Args:
        root: the shard dataset folder (holding ``manifest.json`` and ``samples.parquet``).
        split: ``train``, ``val`` or ``test``.
        label_fraction: keep only the rows of this label fraction (None: all rows).
        label_subset: which seed's subset of it (``shards.subsets``): 0 the build's, k >= 1 drawn again.

    Raises:
        ValueError: no sample left, or a bin the manifest does not know.
    """
    root = Path(root)
    manifest = load_manifest(root)
    columns = ["key", "split", "bin", "shard", "offset", "size", "label_index", "fractions", "foreground_bin"]
    if label_fraction is not None and label_subset:
        columns.append("patient_id")
    table = load_samples(root, split, columns=columns)
    if label_fraction is not None:
        table = table.filter(subset_mask(table, manifest, label_fraction, label_subset))
    if table.num_rows == 0:
        known = manifest.get("label_fraction_sizes", {})
        why = f" in label fraction {label_fraction} (the dataset has {known})" if label_fraction else ""
        raise ValueError(f"{root}: no {split!r} samples{why}")
    shapes = {b["name"]: (int(b["height"]), int(b["width"])) for b in manifest["bins"]}
    shard_names, shard_index = np.unique(table["shard"].to_numpy(zero_copy_only=False), return_inverse=True)
    paths = tuple(str(inside(root, s, f"{root}/samples.parquet: shard")) for s in shard_names)
    unlisted = sorted(set(shard_names) - set(shard_entries(manifest)))
    if unlisted:  # a remote store would fetch it unverified: the manifest holds the checksums
        raise DatasetError(f"{root}/samples.parquet: shard {unlisted[0]!r} is not in the manifest")
    bin_col = table["bin"].to_numpy(zero_copy_only=False)
    keys = table["key"].to_numpy(zero_copy_only=False)
    offsets, sizes = table["offset"].to_numpy().astype(np.int64), table["size"].to_numpy().astype(np.int64)
    labels = table["label_index"].to_numpy().astype(np.int64)
    boxes = _boxes(table["foreground_bin"], root)
    bins = {}
    for name in sorted(set(bin_col)):
        if name not in shapes:
            raise ValueError(f"{root}: samples table has bin {name!r}, the manifest does not")
        rows = np.flatnonzero(bin_col == name)
        rows = rows[np.argsort(shard_index[rows], kind="stable")]  # shard after shard, for the shuffle blocks
        bins[name] = BinSamples(
            name,
            *shapes[name],
            keys[rows],
            shard_index[rows].astype(np.int32),
            offsets[rows],
            sizes[rows],
            labels[rows],
            boxes[rows],
        )
    return SplitSamples(
        split,
        manifest["codec"]["name"],
        paths,
        bins,
        tuple(manifest.get("class_names") or ()),
    )


class ShardFiles:
    """Reads byte ranges of the shards with ``os.pread``, keeping the last few tars open.

    Safe to pickle into worker processes (descriptors are dropped) and to use after a fork (a new process
    opens its own).
    """

    def __init__(self, paths: tuple[str, ...], store: ShardStore | None = None) -> None:
        self.paths = paths
        self.store = store
        """Opens remote shards (fetched into the node cache, held against eviction while open)."""
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._pid = os.getpid()
        # an open remote shard cannot be evicted: keep as few open as the store allows, so a node cache smaller
        # than the dataset always has room for the next shuffle block
        self.max_open = store.cfg.max_pinned if store is not None and store.remote else _MAX_OPEN_SHARDS

    def read(self, shard: int, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` of shard number ``shard``."""
        return self.read_rows([shard], [offset], [size])[0]

    def read_rows(self, shards: list[int], offsets: list[int], sizes: list[int]) -> list[bytes]:
        """The byte ranges ``(shards[i], offsets[i], sizes[i])`` in order: a batch's images in one call (the
        per-image work is a dict look-up and a ``pread``)."""
        if self._pid != os.getpid():
            self._fds, self._pid = OrderedDict(), os.getpid()
        out, fds = [], self._fds
        for shard, offset, size in zip(shards, offsets, sizes, strict=True):
            fd = fds.get(shard)
            if fd is None:
                fd = self._open(shard)
            else:
                fds.move_to_end(shard)
            data = os.pread(fd, size, offset)
            if len(data) != size:
                raise DatasetError(
                    f"{self.paths[shard]}: truncated, wanted {size} bytes at {offset}, got {len(data)}; "
                    "run `radstream verify-shards` on the dataset"
                )
            out.append(data)
        return out

    def _open(self, shard: int) -> int:
        if len(self._fds) >= self.max_open:
            os.close(self._fds.popitem(last=False)[1])
        path = self.paths[shard]
        fd = self.store.open(path) if self.store else os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        self._fds[shard] = fd
        return fd

    def close(self) -> None:
        """Close the open descriptors (of this process)."""
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = OrderedDict()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": OrderedDict(), "_pid": None}

    def __del__(self) -> None:
        with contextlib.suppress(OSError, AttributeError):  # interpreter shutdown
            self.close()
