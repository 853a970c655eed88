"""A shard dataset as local files: the interface the loader reads shards through.

:class:`ShardStore` is a local folder read in place; ``radstream.shards.remote.RemoteStore`` gives the same interface
for a dataset on ``s3://`` or ``http(s)://``, fetching each file into the node cache on first use.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from radstream.shards.layout import UnsafePathError, inside, load_manifest, load_samples, safe_rel


class ShardStore:
    """A shard dataset as local files. This base class is a local folder read in place (no copy, no cache);
    :class:`RemoteStore` adds fetching. Picklable, so it can travel to DataLoader workers."""

    remote = False
    """Whether files are fetched on demand (then worth prefetching)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.url = str(root)
        self.root = Path(root).resolve()  # absolute: the loader joins shard names onto it, rel() strips it
        """A folder laid out like the dataset (manifest.json, samples.parquet, shards on demand)."""
        self.manifest = load_manifest(self.root)

    def __getstate__(self) -> dict:
        # a DataLoader worker only opens files: it is sent the folder, not the manifest (megabytes at 10k
        # shards, once per worker), and reads the manifest again if it ever asks for it
        state = self.__dict__.copy()
        state.pop("manifest", None)
        return state

    def __getattr__(self, name: str):
        if name != "manifest" or "root" not in self.__dict__:
            raise AttributeError(name)
        self.manifest = load_manifest(self.root)
        return self.manifest

    def samples(self, split: str | None = None, columns: list[str] | None = None) -> pa.Table:
        """The samples table (optionally one split)."""
        return load_samples(self.root, split, columns)

    def rel(self, path: str | os.PathLike[str]) -> str:
        """A dataset-relative path from a relative one or an absolute one under ``root``, refused
        (:class:`~radstream.shards.layout.UnsafePathError`) when it is not a plain path inside the dataset."""
        p = Path(path)
        if p.is_absolute():
            if not p.is_relative_to(self.root):
                raise UnsafePathError(f"{p} is not inside the dataset at {self.url}; refused")
            p = p.relative_to(self.root)
        return safe_rel(p.as_posix(), "dataset file")

    def local_path(self, rel: str | os.PathLike[str]) -> Path:
        """The local file of ``rel`` (a shard's .tar or .idx, or any file of the dataset); a symlink that
        leads outside the dataset is refused."""
        path = inside(self.root, self.rel(rel), "dataset file")
        if not path.is_file():
            raise FileNotFoundError(f"{path}: not in the dataset at {self.url}")
        return path

    def open(self, rel: str | os.PathLike[str]) -> int:
        """A read-only descriptor of ``rel``'s local file; the caller closes it."""
        return os.open(self.local_path(rel), os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))

    def prefetch(self, rels: Sequence[str | os.PathLike[str]]) -> None:
        """Fetch ``rels`` in the background, in order (nothing to do for a local folder)."""

    def release(self, rel: str | os.PathLike[str]) -> None:
        """Let ``local_path``'s hold on ``rel`` go (nothing to do for a local folder)."""

    def wait(self) -> None:
        """Block until every queued prefetch has finished."""

    def close(self) -> None:
        """Stop background work and let every hold go."""

    def __enter__(self) -> ShardStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
