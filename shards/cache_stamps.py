"""What each file of the node cache was when it was committed, so that a later reader can tell it changed.

A stamp is ``[size, mtime_ns, inode, sha256]``: the stat of the committed file with the sha256 taken while it
was downloaded, one small JSON file per cached file under ``<cache>/.stamps/`` (written atomically, read by
every process of the node). A file whose stat still matches its stamp is trusted without reading it, as the
local record of verified shards does (``radstream.shards.integrity.VerifiedRecord``); any write moves the mtime.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path

from radstream.core.atomic import write_json
from radstream.shards.layout import safe_rel

STAMPS = ".stamps"


class Stamps:
    """The stamps of one cache folder, with the ones this process has seen kept in memory."""

    def __init__(self, root: Path, makedirs: Callable[[Path], None], file_mode: int = 0o600) -> None:
        self.root, self._makedirs, self._file_mode = root, makedirs, file_mode
        self._known: dict[str, list] = {}
        self._lock = threading.Lock()

    def path(self, rel: str) -> Path:
        """The stamp file of the cached file ``rel``."""
        return self.root / STAMPS / f"{safe_rel(rel, 'cached file')}.json"

    def read(self, rel: str) -> list | None:
        """The stamp on disk (None: none, or unreadable)."""
        try:
            return json.loads(self.path(rel).read_text())
        except (OSError, ValueError):
            return None

    def unchanged(self, rel: str, path: Path, sha256: str | None) -> bool:
        """Whether ``path`` is present with the size, mtime and inode of its stamp, and the stamp's sha256 is
        ``sha256`` when given (one stat; the stamp file is read again only when the memory's does not hold)."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return False
        now = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            stamp = self._known.get(rel)
        if stamp is None or stamp[:3] != now:
            stamp = self.read(rel)  # another process may have fetched it again since
        if stamp is None or stamp[:3] != now or (sha256 is not None and stamp[3] != sha256):
            return False
        with self._lock:
            self._known[rel] = stamp
        return True

    def write(self, rel: str, path: Path, sha256: str) -> None:
        """Stamp the file now at ``path`` with ``sha256``."""
        st = path.stat()
        stamp = [st.st_size, st.st_mtime_ns, st.st_ino, sha256]
        target = self.path(rel)
        self._makedirs(target.parent)
        write_json(target, stamp, indent=None).chmod(self._file_mode)
        with self._lock:
            self._known[rel] = stamp

    def drop(self, rel: str) -> None:
        """Forget ``rel`` (it was evicted)."""
        self.path(rel).unlink(missing_ok=True)
        with self._lock:
            self._known.pop(rel, None)
