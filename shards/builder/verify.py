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
from radstream.shards.codecs import decode, extension
from radstream.shards.index import ShardReader, read_index, verify_index
from radstream.shards.integrity import check_samples_table, sha256_of
from radstream.shards.layout import SAMPLES, DatasetError, inside, load_samples
from radstream.shards.manifest import read_manifest


@dataclass
class VerifyReport:
    """What verification found: counts checked and one line per problem."""

    shards: int = 0
    samples: int = 0
    decoded: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)

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
    rep.problems.extend(f"{shard['path']}: {p}" for p in verify_index(tar, idx))
    entries = read_index(idx)
    rep.samples += len(entries)
    if len(entries) != shard["samples"]:
        rep.problems.append(f"{shard['path']}: {len(entries)} samples, manifest says {shard['samples']}")
    ext = "jpg" if codec == "jpg" else ("png" if codec.startswith("png") else codec)
    with ShardReader(tar) as reader:
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


class _Rows:
    """The samples table's rows, grouped by shard in Arrow (no Python object per row), checked shard by
    shard against each tar's index while ``verify_shards`` has it in hand; only a row with a problem becomes
    a Python object, for its message."""

    def __init__(self, root: Path, manifest: dict, todo: list) -> None:
        self.head: list[str] = []
        """Problems of the table as a whole."""
        self.ext = extension(manifest["codec"]["name"])
        self.where = {s["path"]: (s["split"], b["name"]) for s, b in todo}
        self.problems: list[tuple[int, str]] = []
        self.missing: list[str] = []
        self.table, self.rows_of = None, {}
        try:
            check_samples_table(root, manifest)
        except DatasetError as err:
            self.head.append(str(err))  # and still cross-check what rows can be read
        try:
            # every column (the cross-check compares each field a row shares with its .json member); split,
            # bin and shard as dictionaries (a code per row); one chunk: a take per shard, not a concat
            table = load_samples(root, dictionary=["split", "bin", "shard"])
            self.table = table.unify_dictionaries().combine_chunks()
        except (DatasetError, FileNotFoundError) as err:
            if not any(str(root / SAMPLES) in p for p in self.head):
                self.head.append(str(err))
            return
        shard = self.table["shard"].combine_chunks()
        codes = shard.indices.to_numpy(zero_copy_only=False)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(len(shard.dictionary) + 1))
        self.rows_of = {
            n: order[bounds[i] : bounds[i + 1]] for i, n in enumerate(shard.dictionary.to_pylist())
        }
        for name in [n for n in self.rows_of if n not in self.where]:
            self._report(self.rows_of.pop(name), {})

    def _report(self, rows: np.ndarray, entries: dict) -> None:
        for n, row in zip(rows.tolist(), self.table.take(rows).to_pylist(), strict=True):
            self.problems.append((n, f"{SAMPLES} row {n} (key {row['key']}, shard {row['shard']}): "
                                     f"{_row_problem(row, self.where, entries, self.ext)}"))  # fmt: skip

    def shard_rows(self, path: str) -> dict[int, tuple[int, dict]]:
        """The rows naming shard ``path`` as position → (row number, row): one shard's rows as objects, for
        the cross-check against their members (``radstream.shards.builder.crosscheck``)."""
        if self.table is None or path not in self.rows_of:
            return {}
        rows = self.rows_of[path]
        return {
            row["position"]: (n, row)
            for n, row in zip(rows.tolist(), self.table.take(rows).to_pylist(), strict=True)
        }

    def check(self, path: str, found: list) -> None:
        """The rows naming shard ``path`` against its index entries ``found`` (empty: unreadable shard)."""
        if self.table is None:
            return
        rows = self.rows_of.pop(path, np.zeros(0, np.int64))
        sub = self.table.take(rows)
        split, bin_name = self.where[path]
        ok = pc.and_(pc.equal(sub["split"], split), pc.equal(sub["bin"], bin_name))
        ok = ok.to_numpy(zero_copy_only=False).astype(bool)
        if found:
            pos = sub["position"].to_numpy(zero_copy_only=False)
            inside_ = (pos >= 0) & (pos < len(found))
            at = np.where(inside_, pos, 0)
            spans = np.array([e.components.get(self.ext, (-1, -1)) for e in found], np.int64).reshape(-1, 2)
            keys = pa.array([e.key for e in found], pa.string()).take(pa.array(at))
            ok &= inside_ & pc.equal(sub["key"], keys).to_numpy(zero_copy_only=False)
            ok &= (spans[at, 0] == sub["offset"].to_numpy()) & (spans[at, 1] == sub["size"].to_numpy())
            self._duplicates(path, rows, pos, ok, found)
            covered = np.zeros(len(found), bool)
            covered[pos[ok]] = True
            if not covered.all():
                first = found[int(np.flatnonzero(~covered)[0])].key
                self.missing.append(
                    f"{path}: {int((~covered).sum())} samples have no row in {SAMPLES}, e.g. {first}"
                )
        self._report(rows[~ok], {path: found})

    def _duplicates(self, path: str, rows: np.ndarray, pos: np.ndarray, ok: np.ndarray, found: list) -> None:
        """Rows beyond the shard's samples: a second (third …) row that matches a sample another row of the
        table already describes (a duplicated row passes every per-row check, and the loader would read that
        sample twice per epoch). The first row, in table order, is the sample's; each later one is a problem."""
        matched = np.flatnonzero(ok)
        _, first = np.unique(pos[matched], return_index=True)
        extra = np.ones(len(matched), bool)
        extra[first] = False
        owner = {int(pos[i]): int(rows[i]) for i in matched[first]}
        for i in matched[extra].tolist():
            p = int(pos[i])
            self.problems.append((int(rows[i]), f"{SAMPLES} row {int(rows[i])} (key {found[p].key}, shard {path}): "
                                  f"duplicate of row {owner[p]} (a row beyond the shard's {len(found)} samples)"))  # fmt: skip

    def finish(self, rep: VerifyReport) -> None:
        """The table's problems, its rows' in table order, then the shards' samples without a row."""
        rep.problems.extend(self.head)
        rep.problems.extend(message for _, message in sorted(self.problems))
        rep.problems.extend(self.missing)


def _row_problem(row: dict, where: dict, entries: dict, ext: str) -> str | None:
    if row["shard"] not in where:
        return "shard not in the manifest"
    if where[row["shard"]] != (row["split"], row["bin"]):
        return f"split/bin {row['split']}/{row['bin']}, the manifest says {'/'.join(where[row['shard']])}"
    found = entries.get(row["shard"]) or []
    if not found:
        return None  # the shard itself is reported already
    if not 0 <= row["position"] < len(found):
        return f"position {row['position']} outside the shard's {len(found)} samples"
    entry = found[row["position"]]
    if entry.key != row["key"]:
        return f"the tar holds {entry.key} at position {row['position']}"
    if entry.components.get(ext) != (row["offset"], row["size"]):
        return f"image at {row['offset']}+{row['size']}, the tar has it at {entry.components.get(ext)}"
    return None


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
    rng = random.Random(seed)
    rep = VerifyReport()
    todo = [(s, b) for b in manifest["bins"] for s in b["shards"]]
    samples = _Rows(root, manifest, todo)
    for shard, bin_ in progress(todo, desc="verify", unit="shard"):
        rep.shards += 1
        rows = samples.shard_rows(shard["path"])
        found = _check_shard(root, shard, bin_, codec, quick_share if quick else 1.0, rng, rep, rows)
        samples.check(shard["path"], found)  # one shard's index entries and rows in memory at a time
    samples.finish(rep)
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
