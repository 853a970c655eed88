"""File modes for data about patients: nothing radstream writes for a dataset is readable by other users.

Shard datasets, their build folders, run folders and node caches can hold pseudonymous but still personal
data (images of patients). Processes that write them clear the group and other bits of their umask
(:func:`restrict_umask`), and the folders that hold identifiers (a dataset's ``_private/`` and ``_work/``)
get explicit modes whatever the umask (:func:`private_folder`, :func:`make_private`). A cache shared by a
group is opened up on purpose, through the group the user names (``remote.cache_group``).
"""

from __future__ import annotations

import os
from pathlib import Path

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600


def restrict_umask() -> int:
    """Add group and other to this process's umask (files 0600, folders 0700 from now on); returns the old
    umask. Stricter bits the user set stay set."""
    old = os.umask(0o077)
    os.umask(old | 0o077)
    return old


def private_folder(path: str | os.PathLike[str]) -> Path:
    """``path`` as a folder only its owner can enter (created where missing)."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(PRIVATE_DIR_MODE)
    return folder


def make_private(path: str | os.PathLike[str]) -> Path:
    """``path`` (a file) readable and writable by its owner only."""
    Path(path).chmod(PRIVATE_FILE_MODE)
    return Path(path)
