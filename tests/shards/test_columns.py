"""The loader's sample columns: built once per node from the samples table, mapped by every process, pickled
into workers as a path."""

from __future__ import annotations

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from radstream.shards import column_cache
from radstream.shards import columns as cols
from radstream.shards.loader_data import load_split
from radstream.shards.store import ShardStore


def table_rows(root: Path, split: str) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(root / "samples.parquet").to_pylist() if r["split"] == split}


def test_columns_hold_the_split_rows_per_bin_in_stored_order(tiny_shards: Path, tmp_path: Path) -> None:
    rows = table_rows(tiny_shards, "train")
    data = load_split(tiny_shards, "train", cache_dir=str(tmp_path))
    assert sum(data.counts.values()) == len(rows) and list(data.bins) == sorted(data.bins)
    for name, b in data.bins.items():
        keys = b.keys[np.arange(len(b))].tolist()
        assert all(rows[k]["bin"] == name for k in keys)
        stored = sorted(keys, key=lambda k: (rows[k]["shard"], rows[k]["position"]))
        assert keys == stored  # shard after shard, each shard in tar order
        for i, key in enumerate(keys):
            r = rows[key]
            assert b.keys[i] == key and data.shards[b.shard[i]] == str(tiny_shards / r["shard"])
            assert (b.offset[i], b.size[i], b.label[i]) == (r["offset"], r["size"], r["label_index"])
            assert b.foreground[i].tolist() == r["foreground_bin"]
    fraction = load_split(tiny_shards, "train", 0.1, cache_dir=str(tmp_path))
    expected = {k for k, r in rows.items() if any(abs(f - 0.1) < 1e-9 for f in r["fractions"])}
    assert {k for b in fraction.bins.values() for k in b.keys[np.arange(len(b))]} == expected


def test_the_node_builds_an_entry_once_and_maps_it(tiny_shards: Path, tmp_path: Path, monkeypatch) -> None:
    first = load_split(tiny_shards, "val", cache_dir=str(tmp_path))
    assert first.entry is not None and first.entry.parent == tmp_path / "columns"
    for module, name in ((cols, "build"), (column_cache, "build_streamed")):
        monkeypatch.setattr(
            module, name, lambda *a: pytest.fail("a second process of the node rebuilt the entry")
        )
    again = load_split(tiny_shards, "val", cache_dir=str(tmp_path))
    assert again.entry == first.entry
    for name, b in again.bins.items():
        assert isinstance(b.offset, np.memmap) and isinstance(b.keys.raw, np.memmap)
        assert np.array_equal(b.offset, first.bins[name].offset)
    assert not list((tmp_path / "columns").glob(".*tmp*"))  # written under a temporary name, renamed


_WORKER = """
import pickle, sys
import numpy as np
data = pickle.load(open(sys.argv[1], "rb"))  # a fresh interpreter, as a spawned DataLoader worker
bins = data.bins.values()
assert all(isinstance(b.shard, np.memmap) and isinstance(b.keys.raw, np.memmap) for b in bins)
print(" ".join(k for b in bins for k in b.keys[np.arange(len(b))].tolist()))
"""


def test_a_worker_receives_the_entry_path_not_the_arrays(tiny_shards: Path, tmp_path: Path) -> None:
    data = load_split(tiny_shards, "train", cache_dir=str(tmp_path))
    state = pickle.dumps(data)
    arrays = sum(b.keys.raw.nbytes + b.offset.nbytes for b in data.bins.values())
    assert len(state) < 1000 < arrays  # the path and a few names, whatever the split's size
    from radstream.shards.torch_backend import (
        StepDataset,  # here: the spawned worker below need not import torch
    )

    store = ShardStore(tiny_shards)
    sent = pickle.dumps(StepDataset(data, store))
    assert len(sent) - len(state) < 1000 < len(pickle.dumps(store.manifest))  # nor the manifest
    dataset = pickle.loads(sent)
    assert dataset.files.paths.source == data.entry / "shards.npy"  # the shard names are mapped too
    assert dataset.files.store.manifest == store.manifest  # read again if a worker asks for it
    (tmp_path / "state").write_bytes(state)
    worker = subprocess.run(
        [sys.executable, "-c", _WORKER, str(tmp_path / "state")], capture_output=True, text=True
    )
    assert worker.returncode == 0, worker.stderr
    assert worker.stdout.split() == [
        k for b in data.bins.values() for k in b.keys[np.arange(len(b))].tolist()
    ]


def test_an_unwritable_cache_keeps_the_columns_in_memory(tiny_shards: Path, tmp_path: Path, caplog) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")  # the cache base is a file: no folder can be made under it
    data = load_split(tiny_shards, "test", cache_dir=str(blocker))
    assert data.entry is None and "in memory" in caplog.text
    copy = pickle.loads(pickle.dumps(data))
    for name, b in data.bins.items():
        assert np.array_equal(copy.bins[name].offset, b.offset) and copy.shards[0] == data.shards[0]


def test_fixed_width_keys_from_arrow_buffers() -> None:
    strings = pa.chunked_array([["ab", "", "xyz_-1"], ["q"]])
    assert cols.fixed_width(strings).tolist() == [b"ab", b"", b"xyz_-1", b"q"]
    sliced = pa.array(["first", "second", "third"]).slice(1)  # an offset into the buffers
    out = cols.fixed_width(sliced)
    assert out.dtype == np.dtype("S6") and out.tolist() == [b"second", b"third"]
    assert cols.KeyColumn(out)[1] == "third" and cols.KeyColumn(out)[[1, 0]].tolist() == ["third", "second"]


def test_a_rebuilt_table_gets_a_new_entry(tiny_shards: Path, tmp_path: Path) -> None:
    from radstream.shards.layout import load_manifest

    manifest = load_manifest(tiny_shards)
    name = cols.entry_name(tiny_shards, manifest, "train", None)
    assert name != cols.entry_name(tiny_shards, {**manifest, "samples_sha256": "0" * 64}, "train", None)
    assert name != cols.entry_name(tiny_shards, manifest, "train", 0.1)
    assert name != cols.entry_name(tiny_shards, manifest, "val", None)


def _entry_arrays(entry: Path) -> dict[str, np.ndarray]:
    return {p.stem: np.load(p) for p in sorted(entry.glob("*.npy"))}


@pytest.mark.parametrize(("fraction", "subset"), [(None, 0), (0.1, 0), (0.1, 1), (0.01, 2)])
def test_the_streamed_entry_is_the_in_memory_one(
    tiny_shards: Path, tmp_path: Path, monkeypatch, fraction, subset
) -> None:
    """Written a few rows at a time, from a table whose rows are out of the stored order: the same arrays as
    the whole split read at once (``columns.build``), for the build's subset of a fraction and drawn ones."""
    import hashlib
    import json
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_shards, root, ignore=shutil.ignore_patterns("_work", ".verified-shards.*"))
    table = pq.read_table(root / "samples.parquet")
    pq.write_table(table.take(pa.array(np.random.default_rng(1).permutation(table.num_rows))),
                   root / "samples.parquet", row_group_size=7)  # fmt: skip
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["samples_sha256"] = hashlib.sha256((root / "samples.parquet").read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(column_cache, "BATCH_ROWS", 5)
    data = load_split(root, "train", fraction, subset, cache_dir=str(tmp_path / "cache"))
    meta, arrays = cols.build(root, manifest, "train", fraction, subset)
    stored = _entry_arrays(data.entry)
    assert stored.pop("shards").tolist() == [n.encode() for n in meta["shards"]]
    assert stored.keys() == arrays.keys()
    for name, values in arrays.items():
        assert np.array_equal(stored[name], values) and stored[name].dtype == values.dtype, name
    assert [b[:1] + b[3:] for b in json.loads((data.entry / "meta.json").read_text())["bins"]] == [
        [name, start, stop] for name, start, stop in compute_bins(meta)
    ]


def compute_bins(meta: dict) -> list:
    return [[name, start, stop] for name, _, _, start, stop in meta["bins"]]


def _replicated(tiny_shards: Path, to: Path, times: int) -> Path:
    """A dataset folder whose samples table is tiny_shards' ``times`` over (what load_split reads; the tars
    are not opened)."""
    import shutil

    shutil.copytree(
        tiny_shards, to, ignore=shutil.ignore_patterns("_work", "_private", "*/*/*.tar", ".verified-shards.*")
    )
    table = pq.read_table(tiny_shards / "samples.parquet")
    pq.write_table(pa.concat_tables([table] * times), to / "samples.parquet")
    return to


@pytest.mark.parametrize(("fraction", "subset", "most"), [(None, 0, 30), (0.1, 1, 250)])
def test_the_first_rank_holds_the_mapped_entry_not_arrays(
    tiny_shards: Path, tmp_path: Path, monkeypatch, fraction, subset, most
) -> None:
    """The process that builds the entry writes it a batch at a time and then maps it like every other: the
    numpy and Python memory it used (tracemalloc's peak) does not grow with the split (the whole split read
    at once: ~100 bytes a row for the arrays alone), and each column it returns is a read-only view of the
    entry's file. A drawn subset draws from the split's keys, labels and patients as arrays (~170 bytes a
    row here with the draw's sorted copies, measured; ~360 when they were Python strings)."""
    import tracemalloc

    monkeypatch.setattr(column_cache, "BATCH_ROWS", 64)
    rows, peaks = [], []
    for times in (8, 8, 128):
        root = _replicated(tiny_shards, tmp_path / f"x{times}-{len(peaks)}", times)
        rows.append(pq.ParquetFile(root / "samples.parquet").metadata.num_rows)
        tracemalloc.start()
        data = load_split(root, "train", fraction, subset, cache_dir=str(tmp_path / "cache"))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()  # the first run warms caches up and is not compared
    per_row = (peaks[2] - peaks[1]) / (rows[2] - rows[1])
    assert per_row < most, f"{per_row:.0f} bytes a row while building the entry ({peaks})"
    for b in data.bins.values():
        for values in (b.keys.raw, b.shard, b.offset, b.size, b.label, b.foreground):
            assert isinstance(values, np.memmap) and not values.flags.writeable
            assert Path(values.filename).parent == data.entry


@pytest.mark.parametrize("damage", ["truncated column", "no meta", "torn meta"])
def test_a_half_written_entry_is_built_again(tiny_shards: Path, tmp_path: Path, damage: str) -> None:
    """What a crash of the machine can leave (a rename that reached the disk before the files): never
    mapped, removed and built again by the next process."""
    first = load_split(tiny_shards, "val", cache_dir=str(tmp_path))
    good = _entry_arrays(first.entry)
    if damage == "truncated column":
        path = first.entry / "offset.npy"
        path.write_bytes(path.read_bytes()[:-8])
    elif damage == "no meta":
        (first.entry / "meta.json").unlink()
    else:
        (first.entry / "meta.json").write_text('{"bins": [[')
    (tmp_path / "columns" / f".{first.entry.name}.tmp-99999").mkdir()  # a crashed builder's leftovers
    again = load_split(tiny_shards, "val", cache_dir=str(tmp_path))
    assert again.entry == first.entry and column_cache.complete(again.entry)
    assert {k: v.tolist() for k, v in _entry_arrays(again.entry).items()} == {
        k: v.tolist() for k, v in good.items()
    }
    assert not list((tmp_path / "columns").glob(".*tmp*"))


def test_entries_of_a_replaced_table_are_removed_once_unused(
    tiny_shards: Path, tmp_path: Path, monkeypatch
) -> None:
    import os
    import shutil
    import time

    root = tmp_path / "data"
    shutil.copytree(tiny_shards, root, ignore=shutil.ignore_patterns("_work", ".verified-shards.*"))
    cache = str(tmp_path / "cache")
    old = load_split(root, "val", cache_dir=cache).entry
    other = load_split(tiny_shards, "val", cache_dir=cache).entry  # another dataset's: kept
    table = root / "samples.parquet"
    os.utime(table, ns=(time.time_ns(), table.stat().st_mtime_ns + 10**9))  # rewritten: a new identity
    fresh = load_split(root, "test", cache_dir=cache).entry
    assert old.is_dir()  # used within STALE_AFTER_S: a job may still map it
    past = time.time() - column_cache.STALE_AFTER_S - 60
    os.utime(old / "meta.json", (past, past))
    os.utime(other / "meta.json", (past, past))
    newer = load_split(root, "val", cache_dir=cache).entry
    assert not old.exists() and other.is_dir() and fresh.is_dir() and newer.is_dir() and newer != old
