"""A finished part's files in ``OUT/_work/parts/``: its record (``part-NNNN.json``: counts, rejects, shards;
its presence marks the part finished) and its rows (``part-NNNN.parquet``, one per written sample).

Written by ``radstream.shards.builder.parts``, read by ``radstream.shards.builder.finalize`` without a Python object per row. A record
written before the rows moved to Parquet holds them itself (``"rows"``) and is read as well.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from radstream.core.atomic import write_bytes, write_json
from radstream.core.perms import private_folder


def record_path(out: Path, part: int) -> Path:
    """The part's record: ``OUT/_work/parts/part-NNNN.json`` (its presence marks the part finished)."""
    return out / "_work" / "parts" / f"part-{part:04d}.json"


def save_part(out: Path, record: dict, rows: list[dict]) -> None:
    """The part's rows as Parquet (``part-NNNN.parquet``, read by finalize without a Python object per
    row), then its record, each atomically: a record is only ever beside its rows."""
    path = record_path(out, record["part"])
    private_folder(path.parent)  # rows with paths: the steward's only
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    write_bytes(path.with_suffix(".parquet"), sink.getvalue().to_pybytes())
    write_json(path, record, indent=None)


def part_rows(out: Path, record: dict) -> pa.Table:
    """A finished part's rows (a record written before rows moved to Parquet holds them itself)."""
    if "rows" in record:
        return pa.Table.from_pylist(record["rows"])
    return pq.read_table(record_path(out, record["part"]).with_suffix(".parquet"))


def part_schema(out: Path, record: dict) -> pa.Schema:
    """The schema of :func:`part_rows`, without reading the rows of a Parquet part."""
    if "rows" in record:
        return part_rows(out, record).schema
    return pq.read_schema(record_path(out, record["part"]).with_suffix(".parquet"))
