"""Reading a shard dataset's manifest and samples table, wherever the dataset lies.

A local folder is read in place (``radstream.shards.layout``); a remote one (``s3://``, ``http(s)://``) is read from its
node cache, which ``radstream.shards.remote`` keeps in step with the server.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from radstream.shards.layout import load_manifest, load_samples


def _local_root(root: str | Path) -> Path:
    """A remote dataset is read from its node cache, which holds manifest and samples."""
    from radstream.shards.remote import resolve_dataset
    from radstream.shards.transport import is_remote

    if not is_remote(root):
        return Path(root)
    local, store = resolve_dataset(root)
    store.close()
    return local


def read_manifest(root: str | Path) -> dict:
    """The manifest of a shard dataset (local or remote), with a clear error when it is missing or unreadable."""
    return load_manifest(_local_root(root))


def read_samples(root: str | Path, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
    """The samples table (optionally one split), in the dataset's stored order (split, bin, shard, position);
    local or remote."""
    return load_samples(_local_root(root), split, columns)
