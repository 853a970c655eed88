"""`radstream verify-shards`: re-read a dataset and check it against its manifest."""

from __future__ import annotations

import json
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from radstream.core.progress import progress
from radstream.ingest.privacy import HASH_CHARS
from radstream.shards.builder.crosscheck import shard_row_problems
from radstream.shards.builder.private import source_names
from radstream.shards.builder.verify_rows import TableRows
from radstream.shards.codecs import decode
from radstream.shards.index import ShardReader, read_index, verify_index
from radstream.shards.integrity import sha256_of
from radstream.shards.layout import SAMPLES, inside
from radstream.shards.manifest import read_manifest


@dataclass
class VerifyReport:
    """What verification found: counts checked and one line per problem."""

    shards: int = 0
    samples: int = 0
    decoded: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

    def add(self, shard: VerifyReport) -> None:
        """Count one shard's report in (its problems are listed apart, in the manifest's order)."""
        self.shards += 1
        self.samples += shard.samples
        self.decoded += shard.decoded
        self.bytes += shard.bytes

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        state = "OK" if self.ok else f"FAILED ({len(self.problems)} problems)"
        return (
            f"verify-shards: {state}: {self.shards} shards, {self.samples} samples, "
            f"{self.decoded} images decoded, {self.bytes / 1e6:.1f} MB"
        )


def _check_shard(
    root: Path, shard: dict, bin_: dict, codec: str, decode_share: float, rng, rep, rows: dict
) -> list:
    """Check one shard (and its samples ``rows`` against their members), appending its problems to ``rep``;
    returns its index entries (empty if unreadable)."""
    try:
        return _check_shard_files(root, shard, bin_, codec, decode_share, rng, rep, rows)
    except (OSError, ValueError, tarfile.TarError) as err:  # one broken shard must not hide the others
        rep.problems.append(f"{shard['path']}: unreadable ({str(err).splitlines()[0]})")
        return []


def _check_shard_files(
    root: Path, shard: dict, bin_: dict, codec: str, decode_share: float, rng, rep, rows: dict
) -> list:
    tar = inside(root, shard["path"], "shard")
    idx = tar.with_suffix(".idx")
    if not tar.is_file() or not idx.is_file():
        rep.problems.append(f"{shard['path']}: missing {'tar' if not tar.is_file() else '.idx'}")
        return []
    size = tar.stat().st_size
    rep.bytes += size
    if size != shard["bytes"]:
        rep.problems.append(f"{shard['path']}: {size} bytes, manifest says {shard['bytes']}")
    if sha256_of(tar) != shard["sha256"]:
        rep.problems.append(f"{shard['path']}: sha256 differs from the manifest")
    try:
        entries = read_index(idx)  # read once: checked against the tar, then read through
    except (OSError, ValueError) as err:
        rep.problems.append(f"{shard['path']}: unreadable index: {err}")
        raise
    rep.problems.extend(f"{shard['path']}: {p}" for p in verify_index(tar, idx, entries))
    rep.samples += len(entries)
    if len(entries) != shard["samples"]:
        rep.problems.append(f"{shard['path']}: {len(entries)} samples, manifest says {shard['samples']}")
    ext = "jpg" if codec == "jpg" else ("png" if codec.startswith("png") else codec)
    with ShardReader(tar, entries=entries) as reader:
        for pos, entry in enumerate(entries):
            if rng.random() >= decode_share:
                continue
            _check_sample(reader, pos, entry, ext, codec, bin_, shard["path"], rep)
        rep.problems.extend(shard_row_problems(reader, rows, [e.key for e in entries]))
    return entries


def _check_sample(reader, pos, entry, ext, codec, bin_, where, rep) -> None:
    members = reader.sample(pos)
    if ext not in members:
        rep.problems.append(f"{where}: sample {entry.key} has no .{ext} image")
        return
    try:
        img = decode(members[ext], codec)
    except Exception as err:  # any decoder failure is a finding, reported with the key
        rep.problems.append(f"{where}: sample {entry.key} does not decode ({err})")
        return
    rep.decoded += 1
    if img.shape != (bin_["height"], bin_["width"]):
        rep.problems.append(f"{where}: sample {entry.key} is {img.shape}, bin is {bin_['name']}")
    try:
        meta = json.loads(members.get("json", b"{}"))
    except ValueError as err:
        rep.problems.append(f"{where}: sample {entry.key} has an unreadable .json member ({err})")
        return
    if meta.get("bin") not in (None, bin_["name"]):
        rep.problems.append(f"{where}: sample {entry.key} says bin {meta.get('bin')}")


def _shard_rows(rows: pa.Table | None, numbers: np.ndarray) -> dict[int, tuple[int, dict]]:
    """One shard's rows as position → (row number, row): Python objects for one shard at a time, for the
    cross-check against their members (``radstream.shards.builder.crosscheck``)."""
    if rows is None:
        return {}
    return {row["position"]: (n, row) for n, row in zip(numbers.tolist(), rows.to_pylist(), strict=True)}


def _check_rows(
    table: TableRows, path: str, rows: pa.Table | None, numbers: np.ndarray, found: list
) -> list[str]:
    """The rows naming shard ``path`` against its index entries ``found`` (empty: unreadable shard); the
    problems of rows go to ``table``, the returned line says which samples have no row."""
    if rows is None:
        rows = pa.table({"split": pa.array([], pa.string()), "bin": pa.array([], pa.string()),
                         "position": pa.array([], pa.int64())})  # fmt: skip
    split, bin_name = table.where[path]
    ok = pc.and_(pc.equal(rows["split"], split), pc.equal(rows["bin"], bin_name))
    ok = ok.to_numpy(zero_copy_only=False).astype(bool)
    missing = []
    if found:
        pos = rows["position"].to_numpy(zero_copy_only=False)
        inside_ = (pos >= 0) & (pos < len(found))
        at = np.where(inside_, pos, 0)
        spans = np.array([e.components.get(table.ext, (-1, -1)) for e in found], np.int64).reshape(-1, 2)
        keys = pa.array([e.key for e in found], pa.string()).take(pa.array(at, pa.int64()))
        if len(pos):
            ok &= inside_ & pc.equal(rows["key"], keys).to_numpy(zero_copy_only=False)
            ok &= (spans[at, 0] == rows["offset"].to_numpy()) & (spans[at, 1] == rows["size"].to_numpy())
        _duplicates(table, path, numbers, pos, ok, found)
        covered = np.zeros(len(found), bool)
        covered[pos[ok]] = True
        if not covered.all():
            first = found[int(np.flatnonzero(~covered)[0])].key
            missing.append(f"{path}: {int((~covered).sum())} samples have no row in {SAMPLES}, e.g. {first}")
    bad = np.flatnonzero(~ok)
    if len(bad):
        table.report(rows.take(pa.array(bad)), numbers[bad], {path: found})
    return missing


def _duplicates(
    table: TableRows, path: str, numbers: np.ndarray, pos: np.ndarray, ok: np.ndarray, found: list
) -> None:
    """Rows beyond the shard's samples: a second (third …) row that matches a sample another row of the
    table already describes (a duplicated row passes every per-row check, and the loader would read that
    sample twice per epoch). The first row, in table order, is the sample's; each later one is a problem."""
    matched = np.flatnonzero(ok)
    _, first = np.unique(pos[matched], return_index=True)
    extra = np.ones(len(matched), bool)
    extra[first] = False
    owner = {int(pos[i]): int(numbers[i]) for i in matched[first]}
    for i in matched[extra].tolist():
        p, n = int(pos[i]), int(numbers[i])
        table.problems.append((n, f"{SAMPLES} row {n} (key {found[p].key}, shard {path}): "
                               f"duplicate of row {owner[p]} (a row beyond the shard's {len(found)} samples)"))  # fmt: skip


def verify_shards(
    root: str | Path, quick: bool = False, quick_share: float = 0.05, seed: int = 0
) -> VerifyReport:
    """Check every shard: bytes, sha256 and sample count against the manifest, the ``.idx`` against the tar,
    and that images decode to their bin's shape (all of them, or a ``quick_share`` sample with ``quick``);
    then the samples table (sha256, every row against the tars' indexes and against its sample's ``.json`` and
    ``.cls`` members: labels, patients, splits). Every problem is listed, naming the shard
    and the sample; a broken shard does not stop the check of the others."""
    root = Path(root)
    manifest = read_manifest(root)
    codec = manifest["codec"]["name"]
    rep = VerifyReport()
    todo = [(s, b) for b in manifest["bins"] for s in b["shards"]]
    table = TableRows(root, manifest, todo)  # the table streamed: one shard's rows in memory at a time
    found_by: list[list[str]] = [[] for _ in todo]
    missing: list[list[str]] = [[] for _ in todo]
    with progress(total=len(todo), desc="verify", unit="shard") as bar:
        for i, rows, numbers in table.shards():  # in the table's order; problems listed in the manifest's
            shard, bin_ = todo[i]
            one = VerifyReport()
            rng = random.Random(f"{seed}/{shard['path']}")  # the same decoded samples, whatever the order
            share = quick_share if quick else 1.0
            found = _check_shard(root, shard, bin_, codec, share, rng, one, _shard_rows(rows, numbers))
            if table.file is not None:
                missing[i] = _check_rows(table, shard["path"], rows, numbers, found)
            rep.add(one)
            found_by[i] = one.problems
            bar.update()
    rep.problems = [p for lines in found_by for p in lines] + table.head
    rep.problems += [message for _, message in sorted(table.problems)] + [
        p for lines in missing for p in lines
    ]
    written = manifest["counts"]["written"]
    if rep.samples != written:
        rep.problems.append(f"manifest: {written} samples written, shards hold {rep.samples}")
    counts = manifest["counts"]
    if counts["seen"] != counts["written"] + counts["rejected"] + counts["duplicates"]:
        rep.problems.append(f"manifest: count invariant broken {counts}")
    rep.problems = name_sources(rep.problems, source_names(root))
    return rep


_SAMPLE_KEY = re.compile(rf"\b[0-9a-f]{{{HASH_CHARS}}}\b")


def name_sources(problems: list[str], names: dict[str, str]) -> list[str]:
    """Each problem with the source file of every sample key it mentions, from the private map (samples are
    named by keyed path hashes, which say nothing to the user by themselves)."""
    if not names:
        return problems

    def named(match: re.Match) -> str:
        key = match.group()
        return f"{key} ({names[key]})" if key in names else key

    return [_SAMPLE_KEY.sub(named, p) for p in problems]
