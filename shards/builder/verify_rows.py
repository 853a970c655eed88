"""verify-shards' reading of the samples table: streamed in record batches and handed over shard by shard.

At 10M samples the table's columns are gigabytes (keys, patients, hashes, lists), so verify never holds it
whole: a first pass reads only the ``shard`` column (a dictionary code per row) and counts each manifest
shard's rows; a second pass reads every column ``BATCH_ROWS`` rows at a time and keeps each shard's rows
until its count is reached, then hands them to the shard's checks and lets them go. The table is stored
shard after shard, so at most the rows of a batch and of the shard it ends in are held (a table whose rows
are scattered is still checked in full, holding the shards it has begun). Per dataset only a count per shard
is kept, and one line per problem row.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radstream.shards.codecs import extension
from radstream.shards.integrity import check_samples_table
from radstream.shards.layout import SAMPLES, DatasetError

BATCH_ROWS = 1 << 15
"""Rows of the samples table decoded at once (~25 MB of Arrow columns at the benchmark's ~700 bytes a row)."""
_CODED = ["split", "bin", "shard"]  # read as Arrow dictionaries: a code per row, not a string


def shard_numbers(shards: pa.Array, known: pa.Array) -> np.ndarray:
    """Each row's shard as its number in ``known`` (the manifest's shard paths), -1 for a shard not there (or
    none); ``shards`` as a dictionary array, looked up once per distinct value, or as plain strings."""
    if pa.types.is_dictionary(shards.type):
        per_value = (
            pc.index_in(shards.dictionary, value_set=known).fill_null(-1).to_numpy(zero_copy_only=False)
        )
        codes = shards.indices.fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)
        return np.where(codes >= 0, per_value[np.maximum(codes, 0)] if len(per_value) else -1, -1)
    return pc.index_in(shards, value_set=known).fill_null(-1).to_numpy(zero_copy_only=False).astype(np.int64)


class TableRows:
    """The samples table's rows, streamed and grouped by the manifest's shards (``todo``: (shard, bin) in
    manifest order). :meth:`shards` yields each shard's rows once all have been read; rows naming no shard
    of the manifest are problems of their own, found on the way."""

    def __init__(self, root: Path, manifest: dict, todo: list) -> None:
        self.root = root
        self.head: list[str] = []
        """Problems of the table as a whole."""
        self.ext = extension(manifest["codec"]["name"])
        self.paths = [s["path"] for s, _ in todo]
        self.known = pa.array(self.paths, pa.string())
        self.where = {s["path"]: (s["split"], b["name"]) for s, b in todo}
        self.problems: list[tuple[int, str]] = []
        self.file: pq.ParquetFile | None = None
        self.counts = np.zeros(len(todo), np.int64)
        try:
            check_samples_table(root, manifest)
        except DatasetError as err:
            self.head.append(str(err))  # and still cross-check what rows can be read
        try:
            self.file = pq.ParquetFile(root / SAMPLES, read_dictionary=_CODED, buffer_size=1 << 20)
            if self.file.metadata.num_rows and "shard" in self.file.schema_arrow.names:
                for batch in self.file.iter_batches(BATCH_ROWS, columns=["shard"], use_threads=False):
                    found = shard_numbers(batch.column(0), self.known)
                    self.counts += np.bincount(found[found >= 0], minlength=len(todo))
            elif self.file.metadata.num_rows:
                raise DatasetError(f"{root / SAMPLES}: samples table without a shard column")
        except FileNotFoundError:
            self._unreadable(f"{root / SAMPLES}: no samples table (is this a finished shard dataset?)")
        except (pa.ArrowException, OSError, DatasetError) as err:
            self._unreadable(f"{root / SAMPLES}: unreadable samples table ({str(err).splitlines()[0]})")

    def _unreadable(self, message: str) -> None:
        self.file = None
        if not any(str(self.root / SAMPLES) in p for p in self.head):  # one line for the table
            self.head.append(message)

    def shards(self) -> Iterator[tuple[int, pa.Table | None, np.ndarray]]:
        """(manifest shard number, its rows as one table of plain columns, their row numbers in the table):
        each shard as soon as its last row is read, then the shards no row names (rows None)."""
        done = np.zeros(len(self.paths), bool)
        for i, rows, numbers in self._stream():
            done[i] = True
            yield i, rows, numbers
        for i in np.flatnonzero(~done).tolist():
            yield i, None, np.zeros(0, np.int64)

    def _stream(self) -> Iterator[tuple[int, pa.Table, np.ndarray]]:
        if self.file is None:
            return
        held: dict[int, list] = {}
        have = np.zeros(len(self.paths), np.int64)
        start = 0
        try:
            for batch in self.file.iter_batches(BATCH_ROWS, use_threads=False):
                table = _plain(pa.Table.from_batches([batch]))
                found = shard_numbers(batch.column(batch.schema.get_field_index("shard")), self.known)
                numbers = np.arange(start, start + len(found), dtype=np.int64)
                start += len(found)
                stray = np.flatnonzero(found < 0)
                if len(stray):
                    self.report(table.take(pa.array(stray)), numbers[stray], {})
                yield from self._gather(table, found, numbers, held, have)
        except (pa.ArrowException, OSError) as err:
            self._unreadable(f"{self.root / SAMPLES}: unreadable samples table ({str(err).splitlines()[0]})")
        for i, pieces in held.items():  # only if the table changed between the two passes
            yield i, pa.concat_tables([p for p, _ in pieces]), np.concatenate([n for _, n in pieces])

    def _gather(self, table: pa.Table, found: np.ndarray, numbers: np.ndarray, held: dict, have: np.ndarray):
        """Add one batch's rows to their shards' rows; yield each shard whose rows are all read."""
        order = np.argsort(found, kind="stable")
        ordered = found[order]
        firsts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]]) if len(ordered) else ordered
        for a, b in zip(firsts, [*firsts[1:], len(ordered)], strict=True):
            i = int(ordered[a])
            if i < 0:
                continue
            rows = order[a:b]
            contiguous = rows[-1] - rows[0] == len(rows) - 1  # the stored order: a slice, no copy
            piece = table.slice(int(rows[0]), len(rows)) if contiguous else table.take(pa.array(rows))
            held.setdefault(i, []).append((piece, numbers[rows]))
            have[i] += len(rows)
            if have[i] >= self.counts[i]:
                pieces = held.pop(i)
                yield i, pa.concat_tables([p for p, _ in pieces]), np.concatenate([n for _, n in pieces])

    def report(self, rows: pa.Table, numbers: np.ndarray, entries: dict) -> None:
        """One line per row of ``rows`` (table row ``numbers``) with what is wrong with it."""
        for n, row in zip(numbers.tolist(), rows.to_pylist(), strict=True):
            self.problems.append((n, f"{SAMPLES} row {n} (key {row['key']}, shard {row['shard']}): "
                                     f"{_row_problem(row, self.where, entries, self.ext)}"))  # fmt: skip


def _plain(table: pa.Table) -> pa.Table:
    """``table`` with its dictionary columns as plain ones (one batch, or one shard's rows: small)."""
    for i, field in enumerate(table.schema):
        if pa.types.is_dictionary(field.type):
            table = table.set_column(i, field.name, table.column(i).cast(field.type.value_type))
    return table


def _row_problem(row: dict, where: dict, entries: dict, ext: str) -> str | None:
    if row["shard"] not in where:
        return "shard not in the manifest"
    if where[row["shard"]] != (row["split"], row["bin"]):
        return f"split/bin {row['split']}/{row['bin']}, the manifest says {'/'.join(where[row['shard']])}"
    found = entries.get(row["shard"]) or []
    if not found:
        return None  # the shard itself is reported already
    if not 0 <= row["position"] < len(found):
        return f"position {row['position']} outside the shard's {len(found)} samples"
    entry = found[row["position"]]
    if entry.key != row["key"]:
        return f"the tar holds {entry.key} at position {row['position']}"
    if entry.components.get(ext) != (row["offset"], row["size"]):
        return f"image at {row['offset']}+{row['size']}, the tar has it at {entry.components.get(ext)}"
    return None
