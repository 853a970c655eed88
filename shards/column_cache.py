"""The node's column cache (``radstream.shards.columns``): building an entry once per node, checking it, and
removing the entries of replaced tables.

Building. A whole split read into Arrow and turned into numpy arrays peaks at ~300 bytes a sample, and what
the allocators kept of it afterwards stayed with the node's first rank for the whole run (229 MB at 1M
samples): that rank held more than the others for no use. So the entry is written from the samples table a
batch at a time, in two passes over the split's row groups, ``BATCH_ROWS`` rows at a time:

1. count the rows of each (bin, shard) pair and the longest key;
2. write each row at its place (bins sorted by name, each bin's rows shard after shard in stored order: the
   order ``columns.compute_columns`` gives), into the entry's ``.npy`` files mapped for that batch only.

What stays is a count per (bin, shard) pair of the manifest; the builder then maps the entry as every other
process does. A label fraction's drawn subset (``subset`` >= 1) needs the whole split's patients at once: that
entry is built in memory (``columns.build``), as before.

Writing. The files go to a temporary folder, are flushed to disk, and the folder is renamed into place;
``meta.json`` records each file's size, and an entry whose ``meta.json`` is unreadable or whose files are not
those sizes (a crash of the machine between the rename and the disk) is removed and built again under the
lock. Leftover temporary folders of the entry are removed by the next builder.

Cleaning. Each ``load_split`` marks its entry used (the mtime of ``meta.json``). After building an entry, the
builder removes every entry of the same table path whose table identity is not the current one (the table was
rewritten or rebuilt since, or is gone) and that no process has used for ``STALE_AFTER_S``: a job still
running on the replaced table keeps its entry meanwhile; nothing else ages out.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radstream.shards import columns as cols
from radstream.shards.integrity import cache_base
from radstream.shards.layout import SAMPLES, DatasetError, inside, shard_entries
from radstream.shards.subsets import dataset_levels, drawn_mask, stored_mask

log = logging.getLogger(__name__)

STALE_AFTER_S = 3600.0
"""An entry of a replaced table not used for this long is removed by the next build of the node."""
BATCH_ROWS = 1 << 16
"""Rows of the split read, placed and written at once (~10 MB of Arrow columns)."""
_READ = ["split", "key", "bin", "shard", "offset", "size", "label_index", "foreground_bin"]
_CODED = ("split", "bin", "shard")
"""Columns read as dictionaries (a handful of distinct values a row group)."""


def _batches(root: Path, split: str, fraction: float | None, columns: list[str]) -> Iterator[pa.Table]:
    """The split's rows (of the label fraction's stored subset), ``BATCH_ROWS`` at a time: only the row
    groups whose statistics allow the split are read (each row group holds one (split, bin) in format 2.0).
    ``split``, ``bin`` and ``shard`` come as dictionary columns (a few distinct values a row group): a look-up
    is made in their dictionary, not in every row (:func:`_codes`)."""
    path = Path(root) / SAMPLES
    try:
        names = pq.read_schema(path).names
        file = pq.ParquetFile(path, buffer_size=1 << 20, read_dictionary=[c for c in _CODED if c in names])
        index = file.schema_arrow.get_field_index("split")
        groups = [
            g
            for g in range(file.metadata.num_row_groups)
            if _may_hold(file.metadata.row_group(g), index, split)
        ]
        wanted = columns + (["fractions"] if fraction is not None else [])
        is_split = pa.array([split], pa.string())
        for batch in file.iter_batches(BATCH_ROWS, row_groups=groups, columns=wanted, use_threads=False):
            table = pa.Table.from_batches([batch])
            keep = _codes(table["split"], is_split) == 0
            if fraction is not None:
                keep &= stored_mask(table["fractions"], fraction)
            if keep.any():
                yield table.filter(pa.array(keep)) if not keep.all() else table
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no samples table (is this a finished shard dataset?)") from None
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path}: unreadable samples table ({str(err).splitlines()[0]})") from None


def _may_hold(group, index: int, split: str) -> bool:
    stats = group.column(index).statistics if index >= 0 else None
    if stats is None or not stats.has_min_max:
        return True
    return stats.min <= split <= stats.max


def _codes(column: pa.ChunkedArray | pa.Array, value_set: pa.Array) -> np.ndarray:
    """int64 [rows]: each row's index in ``value_set``, -1 where it is not there or null. A dictionary column is
    looked up through its dictionary (the row group's few shards, not its rows)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    as_int = {"zero_copy_only": False}
    if not pa.types.is_dictionary(arr.type):
        return pc.index_in(arr, value_set=value_set).fill_null(-1).to_numpy(**as_int).astype(np.int64)
    lookup = (
        pc.index_in(arr.dictionary, value_set=value_set).fill_null(-1).to_numpy(**as_int).astype(np.int64)
    )
    codes = lookup[arr.indices.fill_null(0).to_numpy(**as_int)] if len(lookup) else np.full(len(arr), -1)
    if arr.null_count:
        codes[arr.is_null().to_numpy(**as_int)] = -1
    return codes


class _Codes:
    """Row → (bin number, shard number) against the manifest's bins and shards, sorted by name; a row naming
    a bin or shard the manifest does not list is refused as ``columns.build`` and ``load_split`` refuse it."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.bins = sorted(b["name"] for b in manifest["bins"])
        self.shards = sorted(shard_entries(manifest))
        self.bin_set, self.shard_set = pa.array(self.bins, pa.string()), pa.array(self.shards, pa.string())

    def __call__(self, table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        b = _codes(table["bin"], self.bin_set)
        if (b < 0).any():
            unknown = table["bin"][int(np.argmax(b < 0))].as_py()
            raise ValueError(f"{self.root}: samples table has bin {unknown!r}, the manifest does not")
        s = _codes(table["shard"], self.shard_set)
        if (s < 0).any():
            name = table["shard"][int(np.argmax(s < 0))].as_py()
            inside(self.root, str(name), f"{self.root}/{SAMPLES}: shard")  # a path outside: refused as such
            raise DatasetError(f"{self.root}/{SAMPLES}: shard {name!r} is not in the manifest")
        return b, s


def build_streamed(
    entry_tmp: Path, root: Path, manifest: dict, split: str, fraction: float | None, subset: int = 0
) -> dict:
    """Write the entry of ``split`` (of a label fraction's stored subset, or of its drawn subset ``subset``
    >= 1) into the folder ``entry_tmp``; returns its meta (``meta.json`` is the caller's, written last)."""
    codes = _Codes(Path(root), manifest)
    pairs = np.zeros(len(codes.bins) * len(codes.shards), np.int64)
    width = 1
    rows = _rows(root, manifest, split, fraction, subset)
    for table in rows(["split", "key", "bin", "shard"]):
        b, s = codes(table)
        pairs += np.bincount(b * len(codes.shards) + s, minlength=len(pairs))
        width = max(width, int(pc.max(pc.binary_length(table["key"])).as_py() or 0))
    if not pairs.sum():
        known = manifest.get("label_fraction_sizes", {})
        why = f" in label fraction {fraction} (the dataset has {known})" if fraction else ""
        raise ValueError(f"{root}: no {split!r} samples{why}")
    used = pairs.reshape(len(codes.bins), -1).sum(axis=0) > 0
    compact = np.cumsum(used) - 1  # manifest shard number -> the entry's (the split's shards, sorted)
    cursor = np.cumsum(pairs) - pairs  # where each (bin, shard) pair's next row goes
    n = int(pairs.sum())
    kinds = {"key": (f"S{width}", (n,)), "shard": (np.int32, (n,)), "offset": (np.int64, (n,)),
             "size": (np.int32, (n,)), "label": (np.int32, (n,)), "foreground": (np.int32, (n, 4))}  # fmt: skip
    for name, (dtype, shape) in kinds.items():
        np.lib.format.open_memmap(entry_tmp / f"{name}.npy", mode="w+", dtype=dtype, shape=shape).flush()
    for table in rows(_READ):
        _place(entry_tmp, table, codes, cursor, compact)
    shapes = {b["name"]: (int(b["height"]), int(b["width"])) for b in manifest["bins"]}
    per_bin = pairs.reshape(len(codes.bins), -1).sum(axis=1)
    stops = np.cumsum(per_bin)
    bins = [[name, *shapes[name], int(stop - count), int(stop)]
            for name, stop, count in zip(codes.bins, stops, per_bin, strict=True) if count]  # fmt: skip
    shards = [name for name, u in zip(codes.shards, used.tolist(), strict=True) if u]
    return {"bins": bins, "shards": shards, "rows": n}


def _rows(root: Path, manifest: dict, split: str, fraction: float | None, subset: int):
    """``rows(columns)``: the batches of the entry's rows. A drawn subset's keys are drawn first, from the
    split's key, label and patient columns read a batch at a time into arrays (no Python object per row: about
    170 bytes a row with the draw's sorted copies, measured), then its rows are read as the stored subset's."""
    if not subset or fraction is None:
        return lambda columns: _batches(root, split, fraction, columns)
    keys, labels, patients = [], [], []
    for table in _batches(root, split, None, ["split", "key", "label_index", "patient_id"]):
        keys.append(cols.fixed_width(table["key"]))
        labels.append(table["label_index"].to_numpy().astype(np.int64))
        patients.append(cols.fixed_width(table["patient_id"]))
    if not keys:
        return lambda columns: iter(())
    key = np.concatenate(keys)
    del keys
    drawn = np.sort(key[drawn_mask(key, np.concatenate(labels), np.concatenate(patients),
                                   dataset_levels(manifest), fraction, subset)])  # fmt: skip
    del key, labels, patients

    def rows(columns: list[str]) -> Iterator[pa.Table]:
        for table in _batches(root, split, None, columns):
            key = cols.fixed_width(table["key"])
            at = np.minimum(np.searchsorted(drawn, key), max(len(drawn) - 1, 0))
            keep = drawn[at] == key if len(drawn) else np.zeros(len(key), bool)
            if keep.any():
                yield table.filter(pa.array(keep))

    return rows


def _place(entry_tmp: Path, table: pa.Table, codes: _Codes, cursor: np.ndarray, compact: np.ndarray) -> None:
    """One batch's rows written at their places (``cursor`` moves on); the files are mapped for this batch
    only, so the written pages do not stay in the process."""
    b, s = codes(table)
    group = b * len(compact) + s
    order = np.argsort(group, kind="stable")
    ordered = group[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    counts = np.diff(np.r_[starts, len(ordered)])
    rank = np.arange(len(ordered)) - np.repeat(starts, counts)
    dest = np.empty(len(ordered), np.int64)
    dest[order] = cursor[ordered] + rank
    cursor[ordered[starts]] += counts
    where = str(Path(codes.root) / SAMPLES)
    size = table["size"].to_numpy()
    if len(size) and size.max() >= 2**31:
        raise ValueError(f"{where}: an image member of {size.max()} bytes (more than 2 GiB)")
    values = {
        "key": cols.fixed_width(table["key"]),
        "shard": compact[s].astype(np.int32),
        "offset": table["offset"].to_numpy().astype(np.int64),
        "size": size.astype(np.int32),
        "label": table["label_index"].to_numpy().astype(np.int32),
        "foreground": cols.boxes(table["foreground_bin"], where).astype(np.int32),
    }
    for name, value in values.items():
        out = np.lib.format.open_memmap(entry_tmp / f"{name}.npy", mode="r+")
        out[dest] = value
        del out  # unmapped: the pages are the page cache's (write_entry syncs the files once, at the end)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor lets the lock go


def complete(entry: Path) -> bool:
    """Whether ``entry`` holds a readable ``meta.json`` and every file at the size it records."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        sizes = meta["files"]
        return all((entry / name).stat().st_size == size for name, size in sizes.items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_entry(
    entry: Path, root: Path, manifest: dict, split: str, fraction: float | None, subset: int
) -> None:
    """Build the entry's files in a temporary folder, flush them to disk and rename the folder into place (a
    reader sees all or none; ``meta.json``'s sizes tell a folder the disk lost half of)."""
    tmp = entry.with_name(f".{entry.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        meta = build_streamed(tmp, root, manifest, split, fraction, subset)
        names = meta.pop("shards")
        np.save(tmp / "shards.npy", np.array([n.encode() for n in names], dtype=f"S{max(map(len, names))}"))
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        meta.update(version=cols.ENTRY_VERSION, split=split, fraction=fraction, subset=subset, files=files,
                    table=cols.table_identity(root, manifest))  # fmt: skip
        (tmp / "meta.json").write_text(json.dumps(meta))
        for path in tmp.iterdir():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
        os.rename(tmp, entry)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def node_entry(
    root: Path, manifest: dict, split: str, fraction: float | None, subset: int, cache_dir: str | None
) -> Path | None:
    """The entry of this split on this node, built first if no process of the node has built it (or its
    files are not whole); None when the cache folder cannot be written (the caller keeps the arrays in
    memory)."""
    base = cache_base(cache_dir) / "columns"
    entry = base / cols.entry_name(root, manifest, split, fraction, subset)
    try:
        if not complete(entry):
            base.mkdir(parents=True, exist_ok=True)
            with _locked(base / f"{entry.name}.lock"):
                if not complete(entry):  # another process of the node may have built it meanwhile
                    for old in [
                        entry,
                        *base.glob(f".{entry.name}.tmp-*"),
                    ]:  # half an entry, a builder's leftovers
                        shutil.rmtree(old, ignore_errors=True)
                    write_entry(entry, root, manifest, split, fraction, subset)
                    pa.default_memory_pool().release_unused()
                    remove_stale(base, cols.table_identity(root, manifest))
        with contextlib.suppress(OSError):  # a read-only cache is mapped all the same
            os.utime(entry / "meta.json")  # used now (what remove_stale looks at)
    except OSError as err:
        log.warning("cannot keep the sample columns at %s (%s): this process holds them in memory", base, err)
        return None
    return entry


def remove_stale(base: Path, identity: list) -> list[Path]:
    """Remove the entries of the table at ``identity[0]`` built from another identity of it (rewritten,
    rebuilt or gone), unused for ``STALE_AFTER_S``; returns them."""
    removed, now = [], time.time()
    for meta_file in base.glob("*/meta.json"):
        try:
            table = json.loads(meta_file.read_text()).get("table")
            idle = now - meta_file.stat().st_mtime
        except (OSError, ValueError, AttributeError):
            continue
        if (
            isinstance(table, list)
            and table
            and table[0] == identity[0]
            and table != identity
            and idle > STALE_AFTER_S
        ):
            shutil.rmtree(meta_file.parent, ignore_errors=True)
            removed.append(meta_file.parent)
    if removed:
        log.info("removed %d column cache entries of a replaced samples table under %s", len(removed), base)
    return removed
