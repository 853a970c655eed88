"""The loader's view of a shard dataset: one split's samples per bin, and reading their bytes by offset.

``load_split`` gives a split's samples as flat arrays per bin (keys, shard, byte range, label, foreground
box) in the dataset's stored order, which is the order the schedule's indices refer to. The arrays are
memory-mapped from the node's column cache (``radstream.shards.columns``): built once per node, shared by every rank and
DataLoader worker, and pickled into a worker as the cache entry's path. ``ShardFiles`` reads an image member
with one ``pread``.
"""

from __future__ import annotations

import contextlib
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from radstream.shards import column_cache
from radstream.shards import columns as cols
from radstream.shards.layout import DatasetError, all_inside, load_manifest, shard_entries
from radstream.shards.store import ShardStore

_MAX_OPEN_SHARDS = 64  # file descriptors kept open per process


@dataclass(frozen=True)
class BinSamples:
    """The samples of one bin of a split, in stored order, shard after shard (the schedule's indices point
    into these arrays; views of the split's mapped columns)."""

    name: str
    height: int
    width: int
    keys: cols.KeyColumn
    """[N] sample keys (fixed-width bytes; indexing gives ``str``)."""
    shard: np.ndarray
    """int32 [N], index into ``SplitSamples.shards``."""
    offset: np.ndarray
    """int64 [N], byte offset of the image member in its tar."""
    size: np.ndarray
    """int32 [N], byte size of the image member."""
    label: np.ndarray
    """int32 [N], class index, -1 unlabeled."""
    foreground: np.ndarray
    """int32 [N, 4], foreground box (y0, x0, y1, x1) in bin pixels."""

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
    """Codec name from the manifest (``radstream.shards.codecs``)."""
    shards: Sequence[str]
    """Absolute tar paths, indexed by ``BinSamples.shard``."""
    bins: dict[str, BinSamples]
    """Bins with at least one sample, by name, sorted."""
    class_names: tuple[str, ...]
    entry: Path | None = None
    """The node's column cache entry the arrays are mapped from (None: held in this process's memory)."""

    @property
    def counts(self) -> dict[str, int]:
        """Samples per bin name."""
        return {name: len(b) for name, b in self.bins.items()}

    @property
    def shard_counts(self) -> dict[str, tuple[int, ...]]:
        """Per bin name, samples per shard in stored order (what the schedule's shuffle blocks group)."""
        return {name: b.shard_counts for name, b in self.bins.items()}

    def __reduce__(self):
        if self.entry is None:
            return super().__reduce__()
        root = self.shards.root  # ShardPaths: the dataset root the relative names are joined to
        return (_mapped_split, (self.entry, root, self.codec, self.class_names))


def _split_samples(meta: dict, arrays: dict, shards: Sequence[str], codec: str, class_names, entry=None):
    bins = {}
    for name, height, width, start, stop in meta["bins"]:
        part = {k: arrays[k][start:stop] for k in cols.COLUMNS}
        bins[name] = BinSamples(name, height, width, cols.KeyColumn(part.pop("key")), **part)
    return SplitSamples(meta["split"], codec, shards, bins, tuple(class_names), entry)


def _mapped_split(entry: Path, root: Path, codec: str, class_names: tuple[str, ...]) -> SplitSamples:
    """A split mapped from its cache entry (what a worker process does with a pickled ``SplitSamples``)."""
    meta, arrays = cols.open_entry(entry)
    return _split_samples(
        meta, arrays, cols.ShardPaths.open(root, entry / "shards.npy"), codec, class_names, entry
    )


def load_split(
    root: str | os.PathLike[str],
    split: str,
    label_fraction: float | None = None,
    label_subset: int = 0,
    cache_dir: str | None = None,
) -> SplitSamples:
    """The split's samples (read once per node into the column cache, then mapped).

    Args:
        root: the shard dataset folder (holding ``manifest.json`` and ``samples.parquet``).
        split: ``train``, ``val`` or ``test``.
        label_fraction: keep only the rows of this label fraction (None: all rows).
        label_subset: which seed's subset of it (``radstream.shards.subsets``): 0 the build's, k >= 1 drawn again.
        cache_dir: the node cache's base (``radstream.shards.integrity.cache_base``), where the column cache lives.

    Raises:
        ValueError: no sample left, or a bin the manifest does not know.
        DatasetError: a shard outside the dataset or not in the manifest.
    """
    root = Path(root)
    manifest = load_manifest(root)
    codec, class_names = manifest["codec"]["name"], tuple(manifest.get("class_names") or ())
    subset = label_subset if label_fraction is not None else 0
    entry = column_cache.node_entry(root, manifest, split, label_fraction, subset, cache_dir)
    if entry is None:
        meta, arrays = cols.build(root, manifest, split, label_fraction, subset)
        names = np.array([n.encode() for n in meta["shards"]])
        data = _split_samples(meta, arrays, cols.ShardPaths(root, names), codec, class_names)
    else:
        data = _mapped_split(entry, root, codec, class_names)
    names = data.shards.relative()
    all_inside(root, names, f"{root}/samples.parquet: shard")
    unlisted = sorted(set(names) - set(shard_entries(manifest)))
    if unlisted:  # a remote store would fetch it unverified: the manifest holds the checksums
        raise DatasetError(f"{root}/samples.parquet: shard {unlisted[0]!r} is not in the manifest")
    return data


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
