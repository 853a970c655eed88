"""A lock that holds between the nodes of a cluster on the filesystems they share.

``flock`` is what radstream uses everywhere a lock must hold: it is released by the kernel when its holder
dies, whatever kills it. On a shared filesystem it holds between nodes where the filesystem passes it on
(NFS v4, GPFS, BeeGFS, Lustre mounted with ``-o flock``); Lustre mounted without either ``flock`` or
``localflock`` refuses it (``ENOSYS``). There :func:`exclusive` falls back to a lock file created with
``O_EXCL`` (atomic on all of them), which its holder touches every ``HEARTBEAT_S`` seconds; a waiter takes
over a lock file untouched for ``STALE_AFTER_S`` (a holder killed with ``kill -9`` or a node that went down).
Lustre mounted with ``localflock`` grants ``flock`` per node only and cannot be told apart from a real lock:
README "Multi-GPU, multi-node, SLURM" says to mount with ``flock``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0
"""How often the holder of a fallback lock file touches it."""
STALE_AFTER_S = 300.0
"""A fallback lock file untouched this long belongs to a holder that died: a waiter takes it over."""
POLL_S = 1.0
"""How often a waiter looks at a fallback lock file again."""
_NO_FLOCK = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL)


@contextlib.contextmanager
def exclusive(path: Path, mode: int = 0o600) -> Iterator[None]:
    """Hold ``path`` exclusively for the block, between processes and nodes (the module's docstring)."""
    path = Path(path)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as err:
        os.close(fd)
        if err.errno not in _NO_FLOCK:
            raise
        log.info("%s: the filesystem has no flock (%s); using a lock file", path, os.strerror(err.errno))
        with _lock_file(path.with_name(path.name + ".held"), mode):
            yield
        return
    try:
        yield
    finally:
        os.close(fd)  # closing the descriptor lets the flock go


@contextlib.contextmanager
def _lock_file(held: Path, mode: int) -> Iterator[None]:
    """Hold ``held`` by creating it (``O_EXCL``); touched every ``HEARTBEAT_S`` while held, removed after."""
    while True:
        try:
            fd = os.open(held, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            _take_over_if_stale(held)
            time.sleep(POLL_S)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{socket.gethostname()} {os.getpid()} {time.time():.0f}\n")
        break
    done = threading.Event()

    def beat() -> None:
        while not done.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(held)

    beating = threading.Thread(target=beat, name=f"lock {held.name}", daemon=True)
    beating.start()
    try:
        yield
    finally:
        done.set()
        beating.join()
        with contextlib.suppress(FileNotFoundError):
            held.unlink()


def _take_over_if_stale(held: Path) -> None:
    """Remove ``held`` if untouched for ``STALE_AFTER_S``. It is renamed aside first and removed only if it is
    still the file found stale: of two waiters that found it stale, the second may rename the first's fresh
    lock file; it puts that back (a hard link, which never replaces a file) and leaves it."""
    try:
        st = held.stat()
        if time.time() - st.st_mtime < STALE_AFTER_S:
            return
        holder = held.read_text().strip()
        aside = held.with_name(f"{held.name}.stale-{socket.gethostname()}-{os.getpid()}")
        os.rename(held, aside)
    except FileNotFoundError:
        return  # let go meanwhile, or taken over by another waiter
    if aside.stat().st_ino != st.st_ino:  # another waiter's fresh lock file: put it back
        with contextlib.suppress(FileExistsError):
            os.link(aside, held)
        aside.unlink()
        return
    log.warning("%s: took over a lock untouched for %.0f s (its holder, %s, is gone)", held,
                time.time() - st.st_mtime, holder)  # fmt: skip
    aside.unlink()
