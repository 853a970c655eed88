"""A node-local folder of downloaded shards, shared by every process on the node; the one owner of "fetch a
file into the cache".

Its user (``radstream.shards.remote.RemoteStore``) knows only the remote side: for each file a :class:`Fetch` says how
many bytes to expect, how to download them into a given local file, and how to tell a good file from a bad one.
``ShardCache.fetch`` / ``ShardCache.open`` do the rest in one call: download lock → is a cached copy still
intact? → reserve the space → download into the partial → verify → commit (atomic rename, stamp) → open with a
shared lock. The protocol is tested without a server (a ``Fetch`` of local bytes).

Layout: the files keep their dataset-relative paths under ``root`` (``root/<split>/<bin>/<name>.tar`` beside
its ``.idx``, plus ``manifest.json`` and ``samples.parquet``), so ``root`` reads like a local shard dataset.
Bookkeeping lives in hidden names: ``root/.locks/<rel>.lock`` (one lock file per cached file, never deleted:
deleting a lock file races with its next user), ``root/.stamps/<rel>.json`` (what a file was when it was
committed), ``root/.cache.lock`` (serializes size accounting and eviction) and ``<dir>/.<name>.partial`` (a
download in progress).

Access: the folder is its owner's only (0700, files 0600), since shards hold images of patients; a cache
shared by the users of a group is opened to that group on purpose (``remote.cache_group``: the folder gets
the group, setgid, 2770, and files 0660).

Locks (``radstream.shards.cache_files``):

- download: exclusive lock on the file's lock file. The holder checks the final name again, downloads into
  the partial, renames it into place (atomic), so waiters find a whole file when they get the lock.
- read: a shared lock on the cached tar itself, held as long as the reader keeps its descriptor open.
- evict: under the cache lock, a non-blocking exclusive lock on a tar; a tar someone reads is skipped. A
  reader that opened the name just before it was unlinked notices (its descriptor's inode is not the name's
  any more) and fetches the shard again.

Cached files are re-checked like a local dataset's shards: a file whose size, mtime and inode are still those
of its stamp (``radstream.shards.cache_stamps``: taken at commit, with the sha256 of the download) is trusted; one that
changed is hashed again and fetched again when it is no longer what was downloaded. A change that keeps size,
mtime and inode is not seen.

Least recently used: every open stamps the tar's access time with a strictly increasing clock (its mtime
stays the commit's, for the stamp), and eviction goes in that order; a tar's ``.idx`` goes with it. Space is
reserved before a download starts (the partial is allocated to its full size), so concurrent downloads cannot
overshoot the bound together, and a full disk shows up before any byte is fetched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from radstream.shards.cache_files import (
    CacheFullError,
    Cancelled,
    ChecksumError,
    Fetch,
    _allocate,
    _sha256,
    flocked,
    make_folders,
    restrict_folder,
    try_exclusive,
)
from radstream.shards.cache_stamps import STAMPS, Stamps
from radstream.shards.layout import inside, safe_rel

log = logging.getLogger(__name__)

__all__ = ["CacheFullError", "Cancelled", "ChecksumError", "Fetch", "ShardCache"]

LOCKS = ".locks"
CACHE_LOCK = ".cache.lock"
PARTIAL_SUFFIX = ".partial"
CHECKSUM_ATTEMPTS = 2  # a corrupt download is fetched once more before giving up
OPEN_ATTEMPTS = 3  # a file evicted between its download and our open is fetched again, this many times
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


@dataclass
class _Entry:
    rel: str
    bytes: int
    """The tar plus its index."""
    used_ns: int


class ShardCache:
    """The cache folder of one dataset: fetch-verify-commit of each file, locks, space, LRU eviction.

    Args:
        root: the folder (created if missing).
        max_bytes: bound on the bytes of all files in it (None: until the disk is full, then LRU eviction).
    """

    def __init__(
        self, root: str | os.PathLike[str], max_bytes: int | None = None, group: str | None = None
    ) -> None:
        if max_bytes is not None and max_bytes < 1:
            raise ValueError(f"max_cache_bytes must be >= 1 or None, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.group = group
        self.file_mode = 0o660 if group else 0o600
        self._dir_mode = 0o2770 if group else 0o700
        self.root.mkdir(parents=True, exist_ok=True)
        restrict_folder(self.root, group, self._dir_mode)
        self.makedirs(self.root / LOCKS)
        self._clock = 0
        self._clock_lock = threading.Lock()
        self.stamps = Stamps(self.root, self.makedirs, self.file_mode)

    def makedirs(self, folder: Path) -> None:
        """Create ``folder`` (inside the cache) and its missing parents with the cache's folder mode."""
        make_folders(self.root, folder, self._dir_mode)

    def __getstate__(self) -> dict:
        return {"root": self.root, "max_bytes": self.max_bytes, "group": self.group}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["max_bytes"], state.get("group"))

    def path(self, rel: str) -> Path:
        """Where the file ``rel`` lives in the cache; a path that would leave the cache (``..``, absolute, a
        symlink out) raises :class:`~radstream.shards.layout.UnsafePathError` before anything is opened or deleted."""
        return inside(self.root, rel, "cached file")

    def partial_path(self, rel: str) -> Path:
        """The download-in-progress name of ``rel``."""
        path = self.path(rel)
        return path.with_name(f".{path.name}{PARTIAL_SUFFIX}")

    def lock_path(self, rel: str) -> Path:
        """The lock file guarding downloads of ``rel``."""
        path = self.root / LOCKS / f"{safe_rel(rel, 'cached file')}.lock"
        self.makedirs(path.parent)
        return path

    def download_lock(
        self, rel: str, cancel: threading.Event | None = None
    ) -> contextlib.AbstractContextManager[int]:
        """Exclusive lock for downloading ``rel``; blocks while another thread or process downloads it, or
        until ``cancel`` is set (then raises :class:`Cancelled`)."""
        return flocked(self.lock_path(rel), cancel=cancel, mode=self.file_mode)

    def cache_lock(self) -> contextlib.AbstractContextManager[int]:
        """Exclusive lock over accounting and eviction of the whole folder."""
        return flocked(self.root / CACHE_LOCK, mode=self.file_mode)

    def touch(self, fd: int) -> None:
        """Mark the open file ``fd`` as just used: its access time from a clock that never repeats in this
        process (its mtime stays the commit's: the stamp compares it)."""
        with self._clock_lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            now = self._clock
        os.utime(fd, ns=(now, os.fstat(fd).st_mtime_ns))

    def fetch(self, rel: str, spec: Fetch, cancel: threading.Event | None = None) -> Path:
        """The cached file of ``rel``, as it was downloaded: fetched (by one thread of one process of the
        node), verified and committed when it is missing, or when it changed since and no longer hashes to
        what was downloaded. ``cancel`` set ends a wait for the download lock (raising :class:`Cancelled`).

        Raises:
            ChecksumError: still wrong after ``CHECKSUM_ATTEMPTS`` downloads (names ``spec.source``).
            CacheFullError: no room for the file.
        """
        path = self.path(rel)
        if self.stamps.unchanged(rel, path, spec.sha256):
            return path
        with self.download_lock(rel, cancel):
            if self.stamps.unchanged(rel, path, spec.sha256) or self._still_good(rel, path, spec):
                return path  # fetched by another thread or process while we waited, or touched but intact
            return self._fill(rel, spec)

    def open(self, rel: str, spec: Fetch, cancel: threading.Event | None = None) -> int:
        """:meth:`fetch`, then a read-only descriptor holding a shared lock: the file cannot be evicted
        until the caller closes it."""
        for _ in range(OPEN_ATTEMPTS):
            self.fetch(rel, spec, cancel)
            fd = self.open_shared(rel)
            if fd is not None:
                return fd
        raise RuntimeError(
            f"{rel} was evicted right after each of {OPEN_ATTEMPTS} downloads: the cache at "
            f"{self.root} is too small for the shards being read at once"
        )

    def open_shared(self, rel: str) -> int | None:
        """Open the cached ``rel`` with a shared lock (it cannot be evicted until the descriptor is closed).

        Returns:
            The descriptor, or None when the file is not (or no longer) in the cache.
        """
        path = self.path(rel)
        try:
            fd = os.open(path, _OPEN_FLAGS)
        except FileNotFoundError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH)
            if os.fstat(fd).st_ino != os.stat(path).st_ino:  # evicted (and maybe refetched) while we waited
                raise FileNotFoundError(path)
            self.touch(fd)
        except FileNotFoundError:
            os.close(fd)
            return None
        return fd

    def _still_good(self, rel: str, path: Path, spec: Fetch) -> bool:
        """A present file whose stat no longer matches its stamp (or that has none): hashed; kept and stamped
        anew when it is what was downloaded and passes ``spec.problems``. Call holding the download lock."""
        if not path.exists():
            return False
        sha, stamp = _sha256(path), self.stamps.read(rel)
        found = [f"sha256 {sha}, downloaded as {stamp[3]}"] if stamp is not None and stamp[3] != sha else []
        found = found or spec.problems(sha, path)
        if not found:
            self.stamps.write(rel, path, sha)
            return True
        log.warning(
            "%s: the cached copy changed since it was downloaded (%s); fetching it again",
            spec.source,
            found[0],
        )
        return False

    def _fill(self, rel: str, spec: Fetch) -> Path:
        """Reserve, download into the partial, verify, commit; a file that fails its check is downloaded again
        (``CHECKSUM_ATTEMPTS`` in all). Call holding the download lock."""
        for attempt in range(1, CHECKSUM_ATTEMPTS + 1):
            partial = self.reserve(rel, spec.size())
            try:
                sha = spec.download(partial)
                found = spec.problems(sha, partial)
            except OSError as err:
                partial.unlink(missing_ok=True)
                if err.errno == errno.ENOSPC:  # a filesystem that could not reserve the space up front
                    raise CacheFullError(
                        f"no space left on the cache disk at {self.root} while writing {spec.source}; "
                        "free space or set remote.max_cache_bytes below the disk's size"
                    ) from err
                raise
            except BaseException:
                partial.unlink(missing_ok=True)
                raise
            if not found:
                return self.commit(partial, rel, sha)
            partial.unlink(missing_ok=True)
            log.warning(
                "%s is corrupt (%s); download %d of %d", spec.source, found[0], attempt, CHECKSUM_ATTEMPTS
            )
        raise ChecksumError(
            f"{spec.source}: corrupt after {CHECKSUM_ATTEMPTS} downloads: {'; '.join(found[:3])}"
        )

    def reserve(self, rel: str, size: int) -> Path:
        """Make room for ``size`` bytes (evicting unused tars, least recently used first) and allocate the
        partial file of ``rel``. Call while holding ``rel``'s download lock.

        Raises:
            CacheFullError: the bound cannot be met, or the disk is full, with every other tar in use.
        """
        partial = self.partial_path(rel)
        if self.max_bytes is not None and size > self.max_bytes:
            raise CacheFullError(
                f"{rel} ({size} bytes) is larger than max_cache_bytes={self.max_bytes} of "
                f"the cache at {self.root}; raise remote.max_cache_bytes"
            )
        partial.unlink(missing_ok=True)  # ours to replace: we hold the download lock, so it is stale
        with self.cache_lock():
            if self.max_bytes is not None:
                self._evict_for(rel, size, self.max_bytes - size, "max_cache_bytes")
            try:
                self._create(partial, size)
            except OSError as err:
                if err.errno != errno.ENOSPC:
                    raise
                partial.unlink(missing_ok=True)
                self._evict_for(rel, size, self.usage()[0] - size, "the free disk space")
                try:
                    self._create(partial, size)
                except OSError as again:
                    partial.unlink(missing_ok=True)
                    if again.errno != errno.ENOSPC:
                        raise
                    raise CacheFullError(
                        f"no space left on the cache disk at {self.root} for {rel} ({size} bytes) even after "
                        "evicting every unused shard: free disk space, set a smaller remote.max_cache_bytes "
                        "or point remote.cache_dir at a larger disk"
                    ) from again
        return partial

    def _create(self, partial: Path, size: int) -> None:
        self.makedirs(partial.parent)
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0), 0o600)
        try:
            os.fchmod(fd, self.file_mode)  # whatever the umask: group-readable only in a group cache
            _allocate(fd, size)
        finally:
            os.close(fd)

    def commit(self, partial: Path, rel: str, sha256: str | None = None) -> Path:
        """Move a finished, verified partial into place (atomic), stamp it with the ``sha256`` taken while it
        was downloaded (hashed here when not given), and mark it used."""
        path = self.path(rel)
        os.replace(partial, path)
        self.stamps.write(rel, path, sha256 or _sha256(path))
        fd = os.open(path, _OPEN_FLAGS)
        try:
            self.touch(fd)
        finally:
            os.close(fd)
        return path

    def usage(self) -> tuple[int, list[_Entry]]:
        """(bytes of every file in the cache, stale partials removed; the tars as eviction candidates)."""
        total, tars, sizes = 0, [], {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d not in (LOCKS, STAMPS)]
            for name in filenames:
                path = Path(dirpath) / name
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue  # renamed or evicted while we walked
                if name.endswith(PARTIAL_SUFFIX) and self._remove_if_stale(path):
                    continue
                total += st.st_size
                sizes[path] = st.st_size
                if name.endswith(".tar") and not name.startswith("."):
                    tars.append(_Entry(str(path.relative_to(self.root)), st.st_size, st.st_atime_ns))
        for entry in tars:
            entry.bytes += sizes.get(self.path(entry.rel).with_suffix(".idx"), 0)
        return total, tars

    def _remove_if_stale(self, partial: Path) -> bool:
        """Delete a partial left by a download that died (nobody holds its download lock)."""
        rel = str(partial.relative_to(self.root).with_name(partial.name[1 : -len(PARTIAL_SUFFIX)]))
        lock = self.lock_path(rel)
        lock.touch(exist_ok=True)  # a download that died before its lock file existed is stale too
        fd = try_exclusive(lock)
        if fd is None:
            return False
        try:
            partial.unlink(missing_ok=True)
        finally:
            os.close(fd)
        log.info("removed the partial download of %s left by a stopped process", rel)
        return True

    def _evict_for(self, rel: str, size: int, limit: int, bound: str) -> None:
        """Evict unused tars, oldest first, until the cache holds at most ``limit`` bytes."""
        total, entries = self.usage()
        busy = 0
        for entry in sorted(entries, key=lambda e: (e.used_ns, e.rel)):
            if total <= limit:
                return
            if entry.rel == rel:
                continue
            if self.evict(entry.rel):
                total -= entry.bytes
            else:
                busy += entry.bytes
        if total > limit:
            raise CacheFullError(
                f"cache {self.root} cannot fit {rel} ({size} bytes) within {bound}: {total} bytes are cached, "
                f"{busy} of them in shards other readers hold open; raise remote.max_cache_bytes, read fewer "
                "shards at once (prefetch) or use a larger disk"
            )

    def evict(self, rel: str) -> bool:
        """Remove a cached tar and its ``.idx`` unless a reader holds it; returns whether it was removed."""
        path = self.path(rel)
        fd = try_exclusive(path)
        if fd is None:
            return False
        try:
            path.unlink(missing_ok=True)
            path.with_suffix(".idx").unlink(missing_ok=True)
            for gone in (rel, str(Path(rel).with_suffix(".idx"))):
                self.stamps.drop(gone)
        finally:
            os.close(fd)
        log.debug("evicted %s from %s", rel, self.root)
        return True
