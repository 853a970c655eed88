"""The node cache's files as the operating system sees them: ``flock`` locks, safe across threads, processes
and forks, the modes of its folders (its owner's only, or a named group's), and one file's fetch (``Fetch``:
its size, how to download it, how to check it; space allocated up front, the sha256 of what arrived).

``flock`` locks belong to an open file description, so they work between threads of one process as well as
between processes (POSIX ``fcntl`` record locks would not). A wait can be cancelled (a closing store must not
wait forever for a lock another process of the node holds).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)

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


def try_exclusive(path: Path) -> int | None:
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


def restrict_folder(root: Path, group: str | None, dir_mode: int) -> None:
    """The cache folder ``root`` its owner's only, or the named ``group``'s (where this user owns it).

    Raises:
        ValueError: no such group on this machine.
    """
    if root.stat().st_uid != os.getuid():
        return
    if group:
        import grp

        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ValueError(f"remote.cache_group {group!r}: no such group on this machine") from None
        os.chown(root, -1, gid)
    root.chmod(dir_mode)


def make_folders(root: Path, folder: Path, dir_mode: int) -> None:
    """Create ``folder`` (inside ``root``) and its missing parents with ``dir_mode``."""
    missing = []
    while not folder.is_dir() and folder != root:
        missing.append(folder)
        folder = folder.parent
    for sub in reversed(missing):
        sub.mkdir(exist_ok=True)
        with contextlib.suppress(PermissionError):  # made by a group member at the same moment
            sub.chmod(dir_mode)


class CacheFullError(RuntimeError):
    """The cache cannot make room for a file: the size bound or the disk is full of files in use."""


class ChecksumError(RuntimeError):
    """A downloaded file does not match what the dataset says, even after fetching it again."""


def _no_problems(sha256: str, path: Path) -> list[str]:
    return []


@dataclass(frozen=True)
class Fetch:
    """What the cache needs to know of one remote file, and nothing of the network."""

    size: Callable[[], int]
    """Its size in bytes (asked only when a download is needed: a small file's may need a request)."""
    download: Callable[[Path], str]
    """Write the file into the given (pre-allocated) local path; returns the sha256 of what it wrote."""
    problems: Callable[[str, Path], list[str]] = field(default=_no_problems)
    """``problems(sha256, path)``: what is wrong with a downloaded or cached file (empty: good)."""
    sha256: str | None = None
    """The sha256 the file must have, when known before downloading (a shard's, from the manifest): a cached
    copy stamped with another is not taken even when unchanged."""
    source: str = ""
    """Where it comes from, for messages."""


def _allocate(fd: int, size: int) -> None:
    """Reserve ``size`` bytes for ``fd`` (real blocks where the filesystem can, else a sparse length)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)


def _sha256(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()
