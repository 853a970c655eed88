"""Checksums of a local dataset's files against its manifest, before training reads them.

A remote dataset is verified as it is downloaded (``shards.remote``); a local folder is read in place, so a
flipped byte in a tar or in ``samples.parquet`` would train silently. Each file's sha256 is computed once per
process and remembered by (path, size, mtime): opening the train, val and test loaders, or reopening them
each epoch, reads each shard once.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from shards.layout import SAMPLES, DatasetError, shard_entries

log = logging.getLogger(__name__)

_SEEN: dict[tuple[str, int, int], str] = {}
_SEEN_LOCK = threading.Lock()


def sha256_of(path: str | os.PathLike[str]) -> str:
    """The sha256 of ``path``, computed once per (path, size, mtime) in this process."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _SEEN_LOCK:
        known = _SEEN.get(key)
    if known is not None:
        return known
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    with _SEEN_LOCK:
        _SEEN[key] = digest.hexdigest()
    return _SEEN[key]


def check_samples_table(root: str | os.PathLike[str], manifest: dict) -> None:
    """Raise :class:`DatasetError` when ``samples.parquet`` differs from the manifest's ``samples_sha256``
    (datasets finalized before it was recorded are not checked)."""
    expected = manifest.get("samples_sha256")
    path = Path(root) / SAMPLES
    if expected is None:
        return
    try:
        found = sha256_of(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (the manifest lists a samples table)") from None
    if found != expected:
        raise DatasetError(
            f"{path}: sha256 differs from the manifest (truncated or corrupt samples table); "
            "rerun `radstream finalize-shards` or fetch the dataset again"
        )


def check_shards(root: str | os.PathLike[str], shards: Iterable[str], manifest: dict) -> None:
    """Raise :class:`DatasetError` naming the first of ``shards`` (paths under ``root``) that is missing, not
    in the manifest, of the wrong size or whose sha256 differs from the manifest's."""
    entries, root = shard_entries(manifest), Path(root)
    for path in shards:
        rel = Path(path).relative_to(root).as_posix() if Path(path).is_absolute() else str(path)
        entry = entries.get(rel)
        if entry is None:
            raise DatasetError(f"{root / rel}: shard named by the samples table is not in the manifest")
        try:
            size = os.stat(root / rel).st_size
        except FileNotFoundError:
            raise DatasetError(f"{root / rel}: shard missing; restore it or rebuild the dataset") from None
        if size != entry["bytes"]:
            raise DatasetError(
                f"{root / rel}: {size} bytes, the manifest says {entry['bytes']} (truncated or replaced shard); "
                "run `radstream verify-shards`"
            )
        if sha256_of(root / rel) != entry["sha256"]:
            raise DatasetError(
                f"{root / rel}: sha256 differs from the manifest (corrupt shard); run `radstream verify-shards` "
                "to see which samples, or set loader.verify=false to train anyway"
            )
    log.debug("checksums of the shards under %s match the manifest", root)
