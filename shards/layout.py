"""The on-disk contract both rooms of ``shards/`` share: where a dataset's manifest and samples table lie and
how they are read from a local folder.

The build writes these files (``shards.build.finalize``); the loader and the remote store read them. Nothing
here knows about building, fetching or decoding, so either side can import it without the other's weight.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = "1.0"
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a local dataset folder, with a clear error when it is missing or unreadable."""
    path = Path(folder) / MANIFEST
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no manifest (is this a finished shard dataset? run finalize-shards)"
        ) from None
    except ValueError as err:
        raise ValueError(f"{path}: unreadable manifest ({err})") from None


def load_samples(folder: str | Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The samples table of a local dataset folder (optionally one split), in stored order (split, bin,
    shard, position)."""
    if split is not None and columns is not None and "split" not in columns:
        columns = [*columns, "split"]
    table = pq.read_table(Path(folder) / SAMPLES, columns=columns)
    if split is not None:
        import pyarrow.compute as pc

        table = table.filter(pc.equal(table["split"], split))
    return table


def shard_entries(manifest: dict) -> dict[str, dict]:
    """Tar path relative to the dataset -> its manifest entry (path, split, samples, bytes, sha256)."""
    return {s["path"]: s for b in manifest["bins"] for s in b["shards"]}
