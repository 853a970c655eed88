"""Publishing a finished local shard build to ``s3://`` or a local folder, so that readers never see a
manifest whose shards are missing (``radstream.shards.remote`` reads what this writes)."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

from radstream.shards.builder.private import find_private_values
from radstream.shards.layout import DUPLICATES, inside, shard_entries
from radstream.shards.loader_config import RemoteConfig
from radstream.shards.transport import filesystem, with_retries

log = logging.getLogger(__name__)
T = TypeVar("T")


def _dataset_files(out: Path, manifest: dict) -> list[tuple[str, int, str | None]]:
    """(rel, bytes, sha256 or None) of every shard and index of a local build, checked against the manifest."""
    files = []
    for rel, entry in shard_entries(manifest).items():
        tar = inside(out, rel, "shard")  # nothing outside the dataset is read and uploaded
        idx = tar.with_suffix(".idx")
        if not tar.is_file() or tar.stat().st_size != entry["bytes"]:
            raise FileNotFoundError(f"{tar}: missing or not the {entry['bytes']} bytes the manifest lists")
        if not idx.is_file():
            raise FileNotFoundError(f"{idx}: the index of a listed shard is missing")
        files += [
            (rel, entry["bytes"], entry["sha256"]),
            (str(idx.relative_to(out)), idx.stat().st_size, None),
        ]
    return files


def _remote_state(fs, base: str, manifest_raw: bytes, retry) -> tuple[dict[str, int], dict[str, str]]:
    """(rel -> size of every file already at the destination, rel -> sha256 the old manifest lists for each
    shard). A different manifest there is deleted first, so its readers get "no manifest", not mixed shards."""
    fs.invalidate_cache()
    try:
        there = {
            p[len(base) + 1 :]: int(i["size"])
            for p, i in retry(lambda: fs.find(base, detail=True), "list").items()
        }
    except FileNotFoundError:
        there = {}
    old_sha = {}
    if "manifest.json" in there:
        old = retry(lambda: fs.cat_file(f"{base}/manifest.json"), "read manifest")
        if old != manifest_raw:
            old_sha = {rel: e["sha256"] for rel, e in shard_entries(json.loads(old)).items()}
            retry(lambda: fs.rm_file(f"{base}/manifest.json"), "delete old manifest")
    return there, old_sha


def _uploads(
    files: list[tuple[str, int, str | None]], there: dict[str, int], old_sha: dict[str, str]
) -> list[tuple[str, int]]:
    """(rel, bytes) of the shard files to send: missing, of another size, listed before with another sha256,
    or the index of a tar that is sent."""
    todo, tar_sent = [], False
    for rel, size, sha in files:
        same = there.get(rel) == size and (sha is None or old_sha.get(rel, sha) == sha)
        tar_sent = (not same) if sha is not None else tar_sent
        if not same or (sha is None and tar_sent):
            todo.append((rel, size))
    return todo


def _finished_manifest(out: Path, url: str) -> bytes:
    """The bytes of the local build's manifest, after checking that ``url`` can be written to."""
    if str(url).startswith(("http://", "https://")):
        raise ValueError(f"cannot publish to {url}: HTTP is read-only here; publish to s3:// and serve that")
    if not (out / "manifest.json").is_file():
        raise FileNotFoundError(f"{out}: no manifest.json (finish the build with finalize-shards first)")
    return (out / "manifest.json").read_bytes()


class PrivateDataError(ValueError):
    """A dataset that would publish identifiers: kept by its build, or found by the scan."""


def check_publishable(out: Path, manifest: dict, files: list[str], allow_identifiers: bool) -> None:
    """Refuse a dataset built with identifiers kept (unless ``allow_identifiers``), and any dataset in which
    a value of its private map (``OUT/_private``: patient ids, source paths, file names) appears in a file
    that would be uploaded.

    Raises:
        PrivateDataError: one line naming the dataset and what was found.
    """
    if manifest.get("privacy", {}).get("identifiers") == "kept":
        if allow_identifiers:
            log.warning("%s: publishing a dataset that keeps patient ids and source paths", out)
            return
        raise PrivateDataError(
            f"{out}: built with identifiers kept (ingest.privacy=off): its files name patients and source "
            "paths; publish it only if the data is public already, with --allow-identifiers"
        )
    found = find_private_values(out, files)
    if found:
        fix = "rebuild it with privacy on"
        if manifest.get("privacy", {}).get("identifiers") == "pseudonymised":  # came in through kept text
            fix = ("privacy was on, so they came in through text the dataset keeps as it is (class names from "
                   "folder labels, label columns) or an edit of its files: remove them there and rebuild")  # fmt: skip
        raise PrivateDataError(
            f"{out}: refusing to publish: {len(found)} files hold patient ids or source paths of its private "
            f"map, e.g. {found[0]}; {fix}"
        )


def publish(
    local_out: str | os.PathLike[str],
    url: str,
    cfg: RemoteConfig | None = None,
    workers: int = 8,
    allow_identifiers: bool = False,
) -> dict:
    """Upload a finished local build to ``url`` (``s3://bucket/prefix`` or a local folder).

    Order: shards and indexes first, then ``samples.parquet``, ``rejects.jsonl`` and ``duplicates.jsonl``,
    ``manifest.json`` last, so a reader never sees a manifest whose files are missing. A different manifest
    already there is deleted first, so readers of the old dataset get "no manifest" rather than mixed shards.
    Resume: a file already there with the same size is skipped, unless the old manifest lists that shard with another
    sha256 (a rebuild that kept the size); an index is uploaded again whenever its tar is.

    Returns:
        ``{"uploaded": files, "skipped": files, "bytes": bytes uploaded}``.

    Raises:
        ValueError: ``url`` is http(s) (read-only).
        FileNotFoundError: the build is not finished or a listed file is missing or of the wrong size.
        RemoteError: the store kept failing.
        PrivateDataError: identifiers kept without ``allow_identifiers``, or found (see
            :func:`check_publishable`). Nothing is uploaded then; ``OUT/_private`` is never uploaded.
    """
    from radstream.core.progress import progress

    cfg, out = cfg or RemoteConfig(), Path(local_out)
    manifest_raw = _finished_manifest(out, url)
    manifest = json.loads(manifest_raw)
    files = _dataset_files(out, manifest)
    meta = [name for name in ("samples.parquet", "rejects.jsonl", DUPLICATES) if (out / name).is_file()]
    check_publishable(out, manifest, [f[0] for f in files] + meta + ["manifest.json"], allow_identifiers)
    fs, base = filesystem(str(url), cfg)

    def retry(call: Callable[[], T], what: str) -> T:
        return with_retries(call, f"{what} {url}", cfg.retries, cfg.backoff_s)

    there, old_sha = _remote_state(fs, base, manifest_raw, retry)
    todo = _uploads(files, there, old_sha)

    def put(rel: str) -> None:
        retry(lambda: fs.put_file(str(out / rel), f"{base}/{rel}"), f"upload {rel} to")

    with ThreadPoolExecutor(workers) as pool:
        list(
            progress(
                pool.map(put, [rel for rel, _ in todo]), total=len(todo), desc="publish shards", unit="file"
            )
        )
    for rel in [*meta, "manifest.json"]:
        put(rel)
    sent = sum(size for _, size in todo) + sum((out / rel).stat().st_size for rel in [*meta, "manifest.json"])
    log.info(
        "published %s to %s: %d shard files uploaded, %d already there",
        out,
        url,
        len(todo),
        len(files) - len(todo),
    )
    return {"uploaded": len(todo) + len(meta) + 1, "skipped": len(files) - len(todo), "bytes": sent}
