"""The on-disk contract both rooms of ``shards/`` share: where a dataset's manifest and samples table lie and
how they are read from a local folder.

The build writes these files (``radstream.shards.builder.finalize``); the loader and the remote store read them. Nothing
here knows about building, fetching or decoding, so either side can import it without the other's weight.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

FORMAT_VERSION = "2.1"
"""2.0: keys, members and tables name samples by keyed hashes and patients by pseudonyms (no ``source``
column); the samples table is written in row groups per (split, bin), so a reader of one split reads only its
row groups (a table in one row group reads the same, only slower). 2.1: identical images in two build parts
are listed in ``duplicates.jsonl``, the manifest's ``cross_part_duplicates`` counts them (2.0 listed them
there). Readers check the major version: a 1.x dataset is refused with a line saying to rebuild it; 2.0 reads."""
SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
SAMPLES = "samples.parquet"
DUPLICATES = "duplicates.jsonl"
"""Groups of identical images that sit in different build parts, one a line (hashes only; published)."""


class DatasetError(ValueError):
    """A shard dataset that cannot be used as it is (missing, unsafe or corrupt); the message is one line
    naming the file and the problem."""


class UnsafePathError(DatasetError):
    """A path read from a manifest, samples table, index or tar that would reach outside its root."""


def safe_rel(rel: str | os.PathLike[str], what: str = "path") -> str:
    """``rel`` if it is a normalised relative path with no ``..`` part, else :class:`UnsafePathError`.

    Every path a dataset names (shards in the manifest and samples table, member names in a tar or index)
    goes through this before anything is opened, written or deleted: the files come from whoever wrote the
    dataset or runs its server, and must not reach outside the dataset or cache folder.
    """
    text = os.fspath(rel)
    parts = text.split("/")  # a leading "/" or "//" gives an empty part
    if "\\" in text or "\0" in text or "" in parts or "." in parts or ".." in parts:
        raise UnsafePathError(f"{what} {text!r} is not a plain relative path inside the dataset; refused")
    return text


def inside(root: str | os.PathLike[str], rel: str | os.PathLike[str], what: str = "path") -> Path:
    """``root / rel`` once ``rel`` is :func:`safe_rel` and the result, symlinks resolved, stays in ``root``."""
    base = Path(root)
    path = base / safe_rel(rel, what)
    real, real_root = path.resolve(), base.resolve()
    if real != real_root and real_root not in real.parents:
        raise UnsafePathError(f"{what} {path} leads outside {real_root} (a symlink to {real}); refused")
    return path


def all_inside(root: str | os.PathLike[str], rels, what: str = "path") -> None:
    """:func:`inside` for many paths at the cost of one ``lstat`` each: their folders (a dataset has a few,
    ``split/bin``) are resolved once, and a path is resolved on its own only where it is a symlink itself
    or its folder leads outside (then :func:`inside` raises its message)."""
    base = Path(root)
    real_root = base.resolve()
    folders: dict[str, tuple[Path, bool]] = {}
    for rel in rels:
        folder, _, name = safe_rel(rel, what).rpartition("/")
        if folder not in folders:
            real = (base / folder).resolve()
            folders[folder] = real, real == real_root or real_root in real.parents
        real, ok = folders[folder]
        # a path not there (yet: a remote dataset's node cache) resolves to itself
        with contextlib.suppress(OSError):
            ok = ok and not stat.S_ISLNK(os.lstat(real / name).st_mode)
        if not ok:
            inside(base, rel, what)


def check_manifest_paths(manifest: dict, where: str | os.PathLike[str]) -> dict:
    """``manifest`` once its format version is this one's and every shard path it lists passes
    :func:`safe_rel` (the message names ``where``)."""
    version = str(manifest.get("format_version", FORMAT_VERSION)) if isinstance(manifest, dict) else ""
    major = FORMAT_VERSION.split(".")[0]
    if version.split(".")[0] != major:
        raise DatasetError(
            f"{where}: shard format {version}, this radstream reads {major}.x; rebuild the dataset with "
            "`radstream build-shards` (format 1.x names samples by file name and carries patient ids)"
        )
    try:
        for b in manifest.get("bins", ()):
            for s in b.get("shards", ()):
                safe_rel(s["path"], "shard")
    except UnsafePathError as err:
        raise UnsafePathError(f"{where}: {err}") from None
    except (AttributeError, KeyError, TypeError) as err:
        raise DatasetError(f"{where}: malformed manifest ({type(err).__name__}: {err})") from None
    return manifest


def load_manifest(folder: str | Path) -> dict:
    """The manifest of a local dataset folder, with a clear error when it is missing or unreadable."""
    if not Path(folder).is_dir():
        what = "a file, not a dataset folder" if Path(folder).exists() else "no such dataset folder"
        raise FileNotFoundError(f"{folder}: {what}")
    path = Path(folder) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: no manifest (is this a finished shard dataset? run finalize-shards)"
        ) from None
    except ValueError as err:
        raise DatasetError(f"{path}: unreadable manifest ({err})") from None
    return check_manifest_paths(manifest, path)


def load_samples(
    folder: str | Path,
    split: str | None = None,
    columns: list[str] | None = None,
    dictionary: list[str] | None = None,
) -> pa.Table:
    """The samples table of a local dataset folder (optionally one split), in stored order (split, bin,
    shard, position); the ``dictionary`` columns as Arrow dictionaries (an int32 per row, not a string)."""
    path = Path(folder) / SAMPLES
    filters = [("split", "=", split)] if split is not None else None
    try:  # a table in row groups per split and bin (format 2): only the split's row groups are read
        return pq.read_table(path, columns=columns, filters=filters, read_dictionary=dictionary)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no samples table (is this a finished shard dataset?)") from None
    except (pa.ArrowException, OSError) as err:
        raise DatasetError(f"{path}: unreadable samples table ({str(err).splitlines()[0]})") from None


def shard_entries(manifest: dict) -> dict[str, dict]:
    """Tar path relative to the dataset -> its manifest entry (path, split, samples, bytes, sha256)."""
    return {s["path"]: s for b in manifest["bins"] for s in b["shards"]}
