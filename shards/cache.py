"""A node-local folder of downloaded shards, shared by every process on the node: a plain store.

It knows where files live, their locks, space reservation and least-recently-used eviction; it never talks to
the network nor calls back into its user. ``shards.remote.RemoteStore`` owns the protocol (what to fetch,
from where, how it is verified) and drives this: ``download_lock`` → ``reserve`` → write the partial →
``commit``; ``open_shared`` to read; ``evict`` when the dataset changed.

Layout: the files keep their dataset-relative paths under ``root`` (``root/<split>/<bin>/<name>.tar`` beside
its ``.idx``, plus ``manifest.json`` and ``samples.parquet``), so ``root`` reads like a local shard dataset.
Bookkeeping lives in hidden names: ``root/.locks/<rel>.lock`` (one lock file per cached file, never deleted:
deleting a lock file races with its next user), ``root/.cache.lock`` (serializes size accounting and
eviction) and ``<dir>/.<name>.partial`` (a download in progress).

Access: the folder is its owner's only (0700, files 0600), since shards hold images of patients; a cache
shared by the users of a group is opened to that group on purpose (``remote.cache_group``: the folder gets
the group, setgid, 2770, and files 0660).

Locks are ``flock`` locks, which belong to an open file description, so they work between threads of one
process as well as between processes (POSIX ``fcntl`` record locks would not):

- download: exclusive lock on the file's lock file. The holder checks the final name again, downloads into
  the partial, renames it into place (atomic), so waiters find a whole file when they get the lock.
- read: a shared lock on the cached tar itself, held as long as the reader keeps its descriptor open.
- evict: under the cache lock, a non-blocking exclusive lock on a tar; a tar someone reads is skipped. A
  reader that opened the name just before it was unlinked notices (its descriptor's inode is not the name's
  any more) and fetches the shard again.

Least recently used: every open stamps the tar's mtime with a strictly increasing clock, and eviction goes
in mtime order; a tar's ``.idx`` goes with it. Space is reserved before a download starts (the partial is
allocated to its full size), so concurrent downloads cannot overshoot the bound together, and a full disk
shows up before any byte is fetched.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shards.layout import inside, safe_rel

log = logging.getLogger(__name__)

LOCKS = ".locks"
CACHE_LOCK = ".cache.lock"
PARTIAL_SUFFIX = ".partial"
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)


class CacheFullError(RuntimeError):
    """The cache cannot make room for a file: the size bound or the disk is full of files in use."""


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for ``fd`` (real blocks where the filesystem can, else a sparse length)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


# Lock descriptors open in this process. A forked child (a DataLoader worker) inherits them, and an flock is
# released only when every descriptor of its open file description is closed: a child that kept the copy
# would keep a download lock its parent let go, and deadlock on it. So a child closes its copies at once.
_HELD: set[int] = set()
_HELD_LOCK = threading.Lock()


def _close_inherited_locks() -> None:
    global _HELD_LOCK
    _HELD_LOCK = threading.Lock()  # the parent's may have been taken by a thread that does not exist here
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


os.register_at_fork(
    before=lambda: _HELD_LOCK.acquire(),
    after_in_parent=lambda: _HELD_LOCK.release(),
    after_in_child=_close_inherited_locks,
)


class Cancelled(Exception):
    """A lock wait given up because its ``cancel`` event was set (the waiter's store is closing)."""


_CANCEL_POLL_S = 0.05  # how often a cancellable lock wait checks its event


def _lock(fd: int, operation: int, cancel: threading.Event | None) -> None:
    """``flock(fd, operation)``; with ``cancel``, polled so that setting the event ends the wait."""
    if cancel is None or operation & fcntl.LOCK_NB:
        fcntl.flock(fd, operation)
        return
    while True:
        if cancel.is_set():
            raise Cancelled("lock wait cancelled")
        try:
            fcntl.flock(fd, operation | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            cancel.wait(_CANCEL_POLL_S)


@contextlib.contextmanager
def flocked(
    path: Path, operation: int = fcntl.LOCK_EX, cancel: threading.Event | None = None, mode: int = 0o600
) -> Iterator[int]:
    """Hold an ``flock`` on ``path`` (created if missing, with ``mode``) for the block; yields the descriptor.

    Raises:
        Cancelled: ``cancel`` was set before the lock was taken (a blocking flock cannot be interrupted, and
            the holder may be another process that keeps it for long).
    """
    with _HELD_LOCK:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), mode)
        _HELD.add(fd)
        if os.fstat(fd).st_uid == os.getuid():
            os.fchmod(fd, mode)  # the umask may have taken the group's bits
    try:
        _lock(fd, operation, cancel)
        yield fd
    finally:
        with _HELD_LOCK:
            _HELD.discard(fd)
            os.close(fd)  # closing the last descriptor of the description releases the lock


def _try_exclusive(path: Path) -> int | None:
    """An open descriptor of ``path`` holding an exclusive lock, or None when it is locked or gone."""
    try:
        fd = os.open(path, _OPEN_FLAGS)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


@dataclass
class _Entry:
    rel: str
    bytes: int
    """The tar plus its index."""
    mtime_ns: int


class ShardCache:
    """The cache folder of one dataset: locks, space reservation, LRU eviction; no network here.

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
        self._restrict_root()
        self.makedirs(self.root / LOCKS)
        self._clock = 0
        self._clock_lock = threading.Lock()

    def _restrict_root(self) -> None:
        """The cache folder's owner only, or the named group (where this user owns the folder)."""
        if self.root.stat().st_uid != os.getuid():
            return
        if self.group:
            import grp

            try:
                gid = grp.getgrnam(self.group).gr_gid
            except KeyError:
                raise ValueError(
                    f"remote.cache_group {self.group!r}: no such group on this machine"
                ) from None
            os.chown(self.root, -1, gid)
        self.root.chmod(self._dir_mode)

    def makedirs(self, folder: Path) -> None:
        """Create ``folder`` (inside the cache) and its missing parents with the cache's folder mode."""
        missing = []
        while not folder.is_dir() and folder != self.root:
            missing.append(folder)
            folder = folder.parent
        for sub in reversed(missing):
            sub.mkdir(exist_ok=True)
            with contextlib.suppress(PermissionError):  # made by a group member at the same moment
                sub.chmod(self._dir_mode)

    def __getstate__(self) -> dict:
        return {"root": self.root, "max_bytes": self.max_bytes, "group": self.group}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["root"], state["max_bytes"], state.get("group"))

    def path(self, rel: str) -> Path:
        """Where the file ``rel`` lives in the cache; a path that would leave the cache (``..``, absolute, a
        symlink out) raises :class:`~shards.layout.UnsafePathError` before anything is opened or deleted."""
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

    def touch(self, path: Path) -> None:
        """Mark ``path`` as just used (mtime from a clock that never repeats in this process)."""
        with self._clock_lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            now = self._clock
        os.utime(path, ns=(now, now))

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
            self.touch(path)
        except FileNotFoundError:
            os.close(fd)
            return None
        return fd

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

    def commit(self, partial: Path, rel: str) -> Path:
        """Move a finished, verified partial into place (atomic) and mark it used."""
        path = self.path(rel)
        os.replace(partial, path)
        self.touch(path)
        return path

    def usage(self) -> tuple[int, list[_Entry]]:
        """(bytes of every file in the cache, stale partials removed; the tars as eviction candidates)."""
        total, tars, sizes = 0, [], {}
        for dirpath, dirnames, filenames in os.walk(self.root):
            if Path(dirpath) == self.root:
                dirnames[:] = [d for d in dirnames if d != LOCKS]
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
                    tars.append(_Entry(str(path.relative_to(self.root)), st.st_size, st.st_mtime_ns))
        for entry in tars:
            entry.bytes += sizes.get(self.path(entry.rel).with_suffix(".idx"), 0)
        return total, tars

    def _remove_if_stale(self, partial: Path) -> bool:
        """Delete a partial left by a download that died (nobody holds its download lock)."""
        rel = str(partial.relative_to(self.root).with_name(partial.name[1 : -len(PARTIAL_SUFFIX)]))
        lock = self.lock_path(rel)
        lock.touch(exist_ok=True)  # a download that died before its lock file existed is stale too
        fd = _try_exclusive(lock)
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
        for entry in sorted(entries, key=lambda e: (e.mtime_ns, e.rel)):
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
        fd = _try_exclusive(path)
        if fd is None:
            return False
        try:
            path.unlink(missing_ok=True)
            path.with_suffix(".idx").unlink(missing_ok=True)
        finally:
            os.close(fd)
        log.debug("evicted %s from %s", rel, self.root)
        return True
