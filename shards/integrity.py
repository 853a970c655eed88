"""Checksums of a local dataset's files against its manifest, before training reads them.

A remote dataset is verified as it is downloaded (``radstream.shards.remote``); a local folder is read in place, so a
flipped byte in a tar or in ``samples.parquet`` would train silently. Each file's sha256 is computed once per
process and remembered by (path, size, mtime): opening the train, val and test loaders, or reopening them
each epoch, reads each shard once.

Across processes and nodes, a record of the verified shards (:class:`VerifiedRecord`): a JSON file beside the
dataset (``<dataset>/.verified-shards.json``), shared by every node that mounts the folder, or, where the
dataset folder cannot be written or locked, one per node under ``<cache base>/verified/`` (the node cache's
base: ``loader.remote.cache_dir``, ``$RADSTREAM_CACHE`` or ``~/.cache/radstream``). A shard whose size, mtime
and inode are those recorded with the manifest's sha256 is not read again. The record is held under a file
lock while the shards are checked, so the ranks (and nodes) starting together hash each shard once between
them (one hashes, the others find the record), and a requeued job starts without re-reading the dataset.
The holder hashes on a few threads (``HASH_THREADS``: enough to keep a disk busy, not so many that they
thrash it) and saves the record as it goes (every ``SAVE_EVERY_S`` seconds), so a job killed mid-way keeps
what it verified. A file rewritten in any way gets a new mtime and is hashed again; what the record cannot
see is a change that keeps size, mtime and inode (bit rot under the file system): `radstream verify-shards`
reads everything. Where no record can be written at all, every process hashes as before.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from radstream.core.atomic import write_json
from radstream.shards.layout import SAMPLES, DatasetError, shard_entries

log = logging.getLogger(__name__)

HASH_THREADS = min(4, os.cpu_count() or 1)
"""Shards hashed at once by the process that holds the record."""
SAVE_EVERY_S = 10.0
"""Seconds between saves of the record while shards are hashed."""
SHARED_RECORD = ".verified-shards.json"
"""The record's name inside the dataset folder (its lock: the same with ``.lock``)."""

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


def check_samples_table(root: str | os.PathLike[str], manifest: dict, url: str | None = None) -> None:
    """Raise :class:`DatasetError` when ``samples.parquet`` differs from the manifest's ``samples_sha256``
    (datasets finalized before it was recorded are not checked). ``url``: ``root`` is the cache of that
    remote dataset (no finalize to advise: the next run fetches the table again)."""
    expected = manifest.get("samples_sha256")
    path = Path(root) / SAMPLES
    if expected is None:
        return
    try:
        found = sha256_of(path)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (the manifest lists a samples table)") from None
    if found != expected and url is not None:
        raise DatasetError(
            f"{path}: sha256 differs from the manifest of {url} (the cached samples table changed while in "
            "use); run again: it is fetched again from there"
        )
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
    """The shards of one dataset folder verified so far: rel path → [size, mtime_ns, inode, sha256].

    Use as a context manager: entering takes the record's file lock (other processes wait) and reads it;
    ``save`` writes it (while holding the lock); leaving saves what was added and lets the lock go. The record
    lies beside the dataset where that folder can be written and locked, else in the node cache; where
    neither can, it is an empty record, kept nowhere.
    """

    def __init__(self, root: Path, base: Path) -> None:
        key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
        self.places = [Path(root) / SHARED_RECORD, base / "verified" / f"{key}.json"]
        self.path = self.places[0]
        self.entries: dict[str, list] = {}
        self.added = False
        self._lock: int | None = None
        self._saved = time.monotonic()

    def __enter__(self) -> VerifiedRecord:
        for path in self.places:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._lock = os.open(path.with_suffix(".lock"), os.O_RDWR | os.O_CREAT, 0o644)
                fcntl.flock(self._lock, fcntl.LOCK_EX)
            except OSError as err:
                log.debug("no record of verified shards at %s (%s)", path, err)
                self._close()
                continue
            self.path = path
            try:
                self.entries = json.loads(path.read_text())
            except (OSError, ValueError):
                self.entries = {}  # none yet, or unreadable: start again
            return self
        log.debug("no record of verified shards can be kept: every process hashes")
        return self

    @staticmethod
    def _stamp(st: os.stat_result, sha256: str) -> list:
        return [st.st_size, st.st_mtime_ns, st.st_ino, sha256]

    def trusts(self, rel: str, st: os.stat_result, sha256: str) -> bool:
        """Whether ``rel`` (its stat ``st``) was verified against ``sha256`` and has not changed since."""
        return self.entries.get(rel) == self._stamp(st, sha256)

    def add(self, rel: str, st: os.stat_result, sha256: str) -> None:
        self.entries[rel], self.added = self._stamp(st, sha256), True
        if time.monotonic() - self._saved >= SAVE_EVERY_S:
            self.save()

    def save(self) -> None:
        """Write what was verified so far (a job killed later keeps it)."""
        try:
            if self._lock is not None and self.added:
                write_json(self.path, self.entries, indent=None)
        except OSError as err:
            log.debug("could not keep the record of verified shards at %s: %s", self.path, err)
        self._saved = time.monotonic()

    def _close(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor lets the flock go
            self._lock = None

    def __exit__(self, *exc) -> None:
        try:
            self.save()
        finally:
            self._close()


def check_shards(
    root: str | os.PathLike[str], shards: Iterable[str], manifest: dict, cache_dir: str | None = None
) -> None:
    """Raise :class:`DatasetError` naming the first of ``shards`` (paths under ``root``) that is missing, not
    in the manifest, of the wrong size or whose sha256 differs from the manifest's. Shards verified before and
    not changed since are not read again (:class:`VerifiedRecord`, beside the dataset or under
    :func:`cache_base` of ``cache_dir``); the others are hashed on ``HASH_THREADS`` threads."""
    entries, root = shard_entries(manifest), Path(root)
    with VerifiedRecord(root, cache_base(cache_dir)) as record:
        todo = [item for item in (_stat_shard(root, p, entries, record) for p in shards) if item is not None]
        with ThreadPoolExecutor(HASH_THREADS) as pool:
            try:
                digests = pool.map(lambda item: sha256_of(root / item[0]), todo)
                for (rel, st, expected), digest in zip(todo, digests, strict=True):
                    if digest != expected:
                        raise DatasetError(
                            f"{root / rel}: sha256 differs from the manifest (corrupt shard); run `radstream "
                            "verify-shards` to see which samples, or set loader.verify=false to train anyway"
                        )
                    record.add(rel, st, expected)
            finally:
                pool.shutdown(cancel_futures=True)
    log.debug("checksums of the shards under %s match the manifest", root)


def _stat_shard(root: Path, path: str, entries: dict, record: VerifiedRecord) -> tuple | None:
    """(rel, stat, manifest sha256) of a shard still to hash; None when the record trusts it. Raises for a
    shard that is not listed, missing or of the wrong size (no hashing needed to tell)."""
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
    return None if record.trusts(rel, st, entry["sha256"]) else (rel, st, entry["sha256"])
