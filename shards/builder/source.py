"""What a build knows of its source between runs: a digest of the files, optionally of their bytes.

A rerun must never mix inputs of two sources, so ``OUT/_work/plan.json`` keeps a digest of the source folder
and ``radstream.shards.builder.plan.get_plan`` refuses a rerun whose source differs. The default digest is one ``stat`` per
file: it sees a file added, removed or renamed, a change of size and any write that moves the modification
time; it cannot see bytes rewritten in place by a tool that keeps the size and restores the mtime (a PACS
export, ``touch -r``). :func:`content_digest` (``--verify-source``) hashes the bytes as well.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator
from pathlib import Path

from radstream.core.config import to_dict
from radstream.shards.builder.config import BuildConfig

UNPLANNED_KEYS = ("workers", "radstream.ingest.privacy.key_file")
"""Config keys that change neither the plan nor a byte written (``plan.plan_fingerprint`` leaves them out;
which privacy key is used counts, where its file lies does not)."""


def _files(root: Path) -> Iterator[tuple[Path, os.stat_result | OSError]]:
    """Every file under ``root`` in a fixed order, with its stat (a link counts as its target, as the scan
    reads it; a dangling link as itself; links to folders are not followed, as by the scan)."""
    errors: list[OSError] = []  # a folder that cannot be listed is part of the digest too
    for dirpath, dirnames, filenames in os.walk(root, onerror=errors.append):
        while errors:
            err = errors.pop()
            yield Path(err.filename or dirpath), err
        dirnames.sort()
        for name in sorted(filenames):
            path = Path(dirpath) / name
            try:
                yield path, path.stat() if path.exists() else path.lstat()
            except OSError as err:
                yield path, err


def _listed_files(cfg: BuildConfig) -> list[Path]:
    """The manifest and IRMA lists the config names (their bytes are part of the source)."""
    return [Path(f) for f in (cfg.ingest.manifest_csv, cfg.ingest.irma_csv) if f and Path(f).is_file()]


def source_digest(cfg: BuildConfig) -> tuple[int, str]:
    """(number of files, hash of their paths, sizes and mtimes) under the source folder, plus the bytes of the
    CSV files the config names: any file added, removed or rewritten with a new size or mtime changes it."""
    digest, count, root = hashlib.sha256(), 0, Path(cfg.source)
    for path, st in _files(root):
        rel = path.relative_to(root)
        line = (
            f"{rel}\0{st.errno}\n" if isinstance(st, OSError) else f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n"
        )
        digest.update(line.encode("utf-8", "surrogateescape"))
        count += 1
    for extra in _listed_files(cfg):
        digest.update(extra.read_bytes())
    return count, digest.hexdigest()[:16]


def content_digest(cfg: BuildConfig) -> str:
    """Hash of every file's path and bytes under the source folder (and the named CSV files): sees what
    :func:`source_digest` cannot, a file rewritten in place with the same size and mtime. Reads each file once
    (a fraction of what decoding it costs)."""
    digest, root = hashlib.sha256(), Path(cfg.source)
    for path, st in _files(root):
        digest.update(str(path.relative_to(root)).encode("utf-8", "surrogateescape") + b"\0")
        if isinstance(st, OSError) or not stat.S_ISREG(st.st_mode):  # never open a pipe: it would block
            digest.update(b"not a regular file")
            continue
        try:
            with open(path, "rb") as f:
                digest.update(hashlib.file_digest(f, "sha256").digest())
        except OSError as err:
            digest.update(f"error {err.errno}".encode())
    for extra in _listed_files(cfg):
        digest.update(hashlib.sha256(extra.read_bytes()).digest())
    return digest.hexdigest()[:32]


def check_out_outside_source(cfg: BuildConfig) -> None:
    """Refuse OUT inside SOURCE, or SOURCE inside OUT, before any work: the shards written would change the
    source under the build (it could never finish: "the source changed") and become inputs of the next run;
    and a replan, which clears OUT of its old shards and hidden work files, would delete files of SOURCE.

    Raises:
        ValueError: OUT is SOURCE, lies inside it, or contains it.
    """
    source, out = Path(cfg.source).resolve(), Path(cfg.out).resolve()
    if source.is_dir() and out.is_relative_to(source):
        raise ValueError(
            f"{cfg.out}: OUT lies inside SOURCE {cfg.source}, so the build would read its own shards; "
            "choose an OUT outside SOURCE"
        )
    if source.is_dir() and source.is_relative_to(out):
        raise ValueError(
            f"{cfg.out}: SOURCE {cfg.source} lies inside OUT, so a rebuild or --force-replan would clear "
            "files of SOURCE; choose an OUT that neither contains SOURCE nor lies inside it"
        )


def _flat(values: dict, prefix: str = "") -> dict[str, object]:
    flat: dict[str, object] = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old: BuildConfig | None, new: BuildConfig) -> str:
    """The options that differ between two build configs, as ``key: old then, new now; ...`` (at most five)."""
    if old is None:
        return "its saved config.yaml is unreadable"
    before, now = _flat(to_dict(old)), _flat(to_dict(new))
    keys = sorted(
        k for k in before.keys() | now.keys() if before.get(k) != now.get(k) and k not in UNPLANNED_KEYS
    )
    shown = [f"{k}: {before.get(k)!r} then, {now.get(k)!r} now" for k in keys[:5]]
    return "; ".join(shown) + (f"; and {len(keys) - 5} more" if len(keys) > 5 else "") or "no option"
