"""One split's samples as columns memory-mapped once per node: what the loader knows about each sample.

At 10M samples a Python object per sample (a key string, a row dict) is the memory of a node, and handing
it to DataLoader workers pickles it once per worker. So the split's rows are turned, once per node, into flat
arrays in a cache entry beside the node cache (``<cache base>/columns/<entry>/``, the base of
``radstream.shards.integrity.cache_base``), which every rank and worker of the node maps read-only: the pages are
shared, and what a worker receives pickled is the entry's path.

An entry is a folder of ``.npy`` files, one row per sample, grouped by bin (bins sorted by name, each bin's
rows in the dataset's stored order, shard after shard: the order the schedule's indices refer to):

    key.npy         S<width> [N]   sample key, fixed-width bytes (decoded only for the rows a batch shows)
    shard.npy       int32 [N]      index into shards.npy
    offset.npy      int64 [N]      byte offset of the image member in its tar
    size.npy        int32 [N]      byte size of the image member
    label.npy       int32 [N]      class index, -1 unlabeled
    foreground.npy  int32 [N, 4]   foreground box (y0, x0, y1, x1) in bin pixels
    shards.npy      S<width> [S]   shard paths relative to the dataset, sorted
    meta.json       split, label fraction, rows, each bin's (name, height, width, start, stop), each file's
                    size, the identity of the table it was built from

The first process of the node to need an entry builds it under a file lock (the others wait, then map it),
in a temporary folder renamed into place, so a reader never sees half an entry
(``radstream.shards.column_cache``: built a batch at a time, checked, stale entries removed). Its name hashes the samples
table's identity (its path, size, mtime and inode, and the manifest's ``samples_sha256``), what the entry
takes from the manifest, the split and the label fraction: a rebuilt or rewritten table gets a new entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from radstream.shards.layout import SAMPLES, load_samples
from radstream.shards.subsets import subset_mask

log = logging.getLogger(__name__)

ENTRY_VERSION = 1
COLUMNS = ("key", "shard", "offset", "size", "label", "foreground")


class KeyColumn:
    """Sample keys as one fixed-width bytes array; indexing decodes only the keys asked for (a ``str`` for
    one position, an array of ``str`` for an index array or slice)."""

    def __init__(self, raw: np.ndarray) -> None:
        self.raw = raw

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, index):
        picked = self.raw[index]
        return picked.decode() if isinstance(picked, bytes) else np.char.decode(picked, "utf-8")

    def tolist(self) -> list[str]:
        """Every key as a ``str`` (a Python object per sample: for tests and small tools, not the loader)."""
        return np.char.decode(self.raw, "utf-8").tolist()


class ShardPaths(Sequence[str]):
    """Absolute shard paths, indexed by the ``shard`` column: the dataset root joined to a mapped array of
    relative names on demand. Pickles as (root, file) when the names come from an entry."""

    def __init__(self, root: Path, names: np.ndarray, source: Path | None = None) -> None:
        self.root, self.names, self.source = Path(root), names, source

    @classmethod
    def open(cls, root: Path, source: Path) -> ShardPaths:
        return cls(root, np.load(source, mmap_mode="r"), source)

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return str(self.root / self.names[index].decode())

    def __iter__(self) -> Iterator[str]:
        return (self[i] for i in range(len(self)))

    def relative(self) -> list[str]:
        """The relative names (one ``str`` per shard, not per sample)."""
        return [n.decode() for n in self.names]

    def __reduce__(self):
        if self.source is None:
            return super().__reduce__()
        return (ShardPaths.open, (self.root, self.source))


def table_identity(root: Path, manifest: dict) -> list:
    """What names the samples table an entry is built from: its resolved path, size, mtime and inode, and the
    manifest's ``samples_sha256`` (a table changed in place, not yet checked against the manifest or with
    loader.verify=false, never reuses the entry of the table it replaced)."""
    path = Path(root) / SAMPLES
    try:
        st = path.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no samples table (is this a finished shard dataset?)") from None
    return [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, manifest.get("samples_sha256")]


def entry_name(root: Path, manifest: dict, split: str, fraction: float | None, subset: int = 0) -> str:
    """The cache entry of one split (and label fraction and its subset) of the dataset at ``root``."""
    identity = table_identity(root, manifest)
    taken = [manifest["codec"]["name"], manifest.get("class_names"), [(b["name"], b["height"], b["width"])
             for b in manifest["bins"]]]  # fmt: skip
    text = json.dumps([ENTRY_VERSION, identity, taken, split, fraction, subset])
    return f"{split}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def fixed_width(strings: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A string column as a fixed-width bytes array ``S<longest>``, built from Arrow's buffers (no Python
    string per row): one copy where every string has the same length (keyed hashes), else a scatter of the
    characters to their (row, position)."""
    arr = strings.combine_chunks() if isinstance(strings, pa.ChunkedArray) else strings
    if pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.string())
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset : arr.offset + n + 1]
    offsets = offsets.astype(np.int64)
    data = np.frombuffer(arr.buffers()[2], dtype=np.uint8) if n else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    width = max(int(lengths.max(initial=0)), 1)
    chars = data[offsets[0] : offsets[-1]] if n else data[:0]
    if n and (lengths == width).all():
        return chars.copy().view(f"S{width}").reshape(n)
    out = np.zeros((n, width), dtype=np.uint8)
    row = np.repeat(np.arange(n), lengths)
    out[row, np.arange(len(chars)) - (offsets[:-1] - offsets[0])[row]] = chars
    return out.view(f"S{width}").reshape(n)


def _sorted_codes(column: pa.ChunkedArray) -> tuple[list[str], np.ndarray]:
    """(sorted distinct values, int32 code of each row): ``np.unique(..., return_inverse=True)`` in Arrow."""
    values = pc.unique(column).sort()
    codes = pc.index_in(column, value_set=values).to_numpy(zero_copy_only=False).astype(np.int32)
    return values.to_pylist(), codes


def boxes(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """The foreground_bin list column as int64 [N, 4] (without a Python object per row)."""
    lists = column.combine_chunks()
    if (pc.list_value_length(lists).fill_null(0).to_numpy(zero_copy_only=False) != 4).any():
        raise ValueError(f"{where}: samples table has a foreground_bin that is not 4 numbers")
    return lists.flatten().to_numpy(zero_copy_only=False).astype(np.int64).reshape(-1, 4)


def compute_columns(table: pa.Table, where: str) -> tuple[dict, dict[str, np.ndarray]]:
    """A split's rows (columns key, bin, shard, offset, size, label_index, foreground_bin) as an entry's
    arrays, grouped by bin, and the bins' (name, start, stop) and shard names."""
    bin_names, bin_code = _sorted_codes(table["bin"])
    shard_names, shard_code = _sorted_codes(table["shard"])
    order = None
    grouped = bin_code.astype(np.int64) * max(len(shard_names), 1) + shard_code
    if (np.diff(grouped) < 0).any():  # stored order is (split, bin, shard, position): sorted already
        order = np.argsort(grouped, kind="stable")
    size = table["size"].to_numpy()
    if len(size) and size.max() >= 2**31:
        raise ValueError(f"{where}: an image member of {size.max()} bytes (more than 2 GiB)")
    arrays = {
        "key": fixed_width(table["key"]),
        "shard": shard_code,
        "offset": table["offset"].to_numpy().astype(np.int64),
        "size": size.astype(np.int32),
        "label": table["label_index"].to_numpy().astype(np.int32),
        "foreground": boxes(table["foreground_bin"], where).astype(np.int32),
    }
    if order is not None:
        arrays = {name: a[order] for name, a in arrays.items()}
    stops = np.cumsum(np.bincount(bin_code, minlength=len(bin_names)))
    bins = [(name, int(stop - count), int(stop)) for name, stop, count in
            zip(bin_names, stops, np.bincount(bin_code, minlength=len(bin_names)), strict=True)]  # fmt: skip
    return {"bins": bins, "shards": shard_names}, arrays


def read_split_table(root: Path, manifest: dict, split: str, fraction: float | None, subset: int) -> pa.Table:
    """The split's rows of the samples table (of one label fraction's subset, ``radstream.shards.subsets``), only the
    columns the loader keeps (and only the row groups of the split, for a table in row groups per split and
    bin)."""
    columns = ["key", "bin", "shard", "offset", "size", "label_index", "foreground_bin"]
    if fraction is None:
        return load_samples(root, split, columns=columns)
    table = load_samples(root, split, columns=columns + ["fractions"] + (["patient_id"] if subset else []))
    return table.filter(subset_mask(table, manifest, fraction, subset)).select(columns)


def build(
    root: Path, manifest: dict, split: str, fraction: float | None, subset: int = 0
) -> tuple[dict, dict[str, np.ndarray]]:
    """An entry's meta and arrays, read from the samples table."""
    table = read_split_table(root, manifest, split, fraction, subset)
    if table.num_rows == 0:
        known = manifest.get("label_fraction_sizes", {})
        why = f" in label fraction {fraction} (the dataset has {known})" if fraction else ""
        raise ValueError(f"{root}: no {split!r} samples{why}")
    meta, arrays = compute_columns(table, str(Path(root) / SAMPLES))
    shapes = {b["name"]: (int(b["height"]), int(b["width"])) for b in manifest["bins"]}
    unknown = [name for name, _, _ in meta["bins"] if name not in shapes]
    if unknown:
        raise ValueError(f"{root}: samples table has bin {unknown[0]!r}, the manifest does not")
    meta["bins"] = [[name, *shapes[name], start, stop] for name, start, stop in meta["bins"]]
    meta.update(version=ENTRY_VERSION, split=split, fraction=fraction, subset=subset, rows=table.num_rows)
    return meta, arrays


def open_entry(entry: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """An entry's meta and its arrays, memory-mapped read-only."""
    meta = json.loads((entry / "meta.json").read_text())
    return meta, {name: np.load(entry / f"{name}.npy", mmap_mode="r") for name in COLUMNS}
