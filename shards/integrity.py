"""Checksums of a local dataset's files against its manifest, before training reads them.

A remote dataset is verified as it is downloaded (``shards.remote``); a local folder is read in place, so a
flipped byte in a tar or in ``samples.parquet`` would train silently. Each file's sha256 is computed once per
process and remembered by (path, size, mtime): opening the train, val and test loaders, or reopening them
each epoch, reads each shard once.

Across processes, a node keeps a record of the shards it verified (:class:`VerifiedRecord`, a JSON file per
dataset folder under ``<cache base>/verified/``, the node cache's base: ``loader.remote.cache_dir``,
``$RADSTREAM_CACHE`` or ``~/.cache/radstream``): a shard whose size, mtime and inode are those recorded with
the manifest's sha256 is not read again. The record is held under a file lock while the shards are checked,
so the ranks of a node starting together hash each shard once between them (one hashes, the others find the
record), and a requeued job starts without re-reading the dataset. A file rewritten in any way gets a new
mtime and is hashed again; what the record cannot see is a change that keeps size, mtime and inode (bit rot
under the file system): `radstream verify-shards` reads everything. Where the record cannot be written (a
read-only home), every process hashes as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

from core.atomic import write_json
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


def cache_base(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The node cache's base folder: ``cache_dir``, else ``$RADSTREAM_CACHE``, else ``~/.cache/radstream``."""
    return Path(
        cache_dir or os.environ.get("RADSTREAM_CACHE") or Path.home() / ".cache" / "radstream"
    ).expanduser()


class VerifiedRecord:
    """The shards of one dataset folder this node has verified: rel path → [size, mtime_ns, inode, sha256].

    Use as a context manager: entering takes the record's file lock (other processes of the node wait) and
    reads it; leaving writes the shards added and lets the lock go. Unwritable: an empty record, kept nowhere.
    """

    def __init__(self, root: Path, base: Path) -> None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        self.path = base / "verified" / f"{key}.json"
        self.entries: dict[str, list] = {}
        self.added = False
        self._lock: int | None = None

    def __enter__(self) -> VerifiedRecord:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = os.open(self.path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        except OSError as err:
            log.debug("no record of verified shards at %s (%s): every process hashes", self.path, err)
            self._close()
            return self
        try:
            self.entries = json.loads(self.path.read_text())
        except (OSError, ValueError):
            self.entries = {}  # none yet, or unreadable: start again
        return self

    @staticmethod
    def _stamp(st: os.stat_result, sha256: str) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]

    def trusts(self, rel: str, st: os.stat_result, sha256: str) -> bool:
        """Whether ``rel`` (its stat ``st``) was verified against ``sha256`` and has not changed since."""
        return self.entries.get(rel) == self._stamp(st, sha256)

    def add(self, rel: str, st: os.stat_result, sha256: str) -> None:
        self.entries[rel], self.added = self._stamp(st, sha256), True

    def _close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor lets the flock go
            self._lock = None

    def __exit__(self, *exc) -> None:
        try:
            if self._lock is not None and self.added:
                write_json(self.path, self.entries, indent=None)
        except OSError as err:
            log.debug("could not keep the record of verified shards at %s: %s", self.path, err)
        finally:
            self._close()


def check_shards(
    root: str | os.PathLike[str], shards: Iterable[str], manifest: dict, cache_dir: str | None = None
) -> None:
    """Raise :class:`DatasetError` naming the first of ``shards`` (paths under ``root``) that is missing, not
    in the manifest, of the wrong size or whose sha256 differs from the manifest's. Shards this node verified
    before and that have not changed since are not read again (:class:`VerifiedRecord`, under
    :func:`cache_base` of ``cache_dir``)."""
    entries, root = shard_entries(manifest), Path(root)
    with VerifiedRecord(root, cache_base(cache_dir)) as record:
        for path in shards:
            _check_shard(root, path, entries, record)
    log.debug("checksums of the shards under %s match the manifest", root)


def _check_shard(root: Path, path: str, entries: dict, record: VerifiedRecord) -> None:
    """One shard against its manifest entry (see :func:`check_shards`)."""
    rel = Path(path).relative_to(root).as_posix() if Path(path).is_absolute() else str(path)
    entry = entries.get(rel)
    if entry is None:
        raise DatasetError(f"{root / rel}: shard named by the samples table is not in the manifest")
    try:
        st = os.stat(root / rel)
    except FileNotFoundError:
        raise DatasetError(f"{root / rel}: shard missing; restore it or rebuild the dataset") from None
    if st.st_size != entry["bytes"]:
        raise DatasetError(
            f"{root / rel}: {st.st_size} bytes, the manifest says {entry['bytes']} (truncated or replaced "
            "shard); run `radstream verify-shards`"
        )
    if record.trusts(rel, st, entry["sha256"]):
        return
    if sha256_of(root / rel) != entry["sha256"]:
        raise DatasetError(
            f"{root / rel}: sha256 differs from the manifest (corrupt shard); run `radstream verify-shards` "
            "to see which samples, or set loader.verify=false to train anyway"
        )
    record.add(rel, st, entry["sha256"])
