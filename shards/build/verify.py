"""`radstream verify-shards`: re-read a dataset and check it against its manifest."""

from __future__ import annotations

import json
import random
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from core.progress import progress
from ingest.privacy import HASH_CHARS
from shards.build.crosscheck import rows_by_shard, shard_row_problems
from shards.build.private import source_names
from shards.codecs import decode, extension
from shards.index import ShardReader, read_index, verify_index
from shards.integrity import check_samples_table, sha256_of
from shards.layout import SAMPLES, DatasetError, inside, load_samples
from shards.manifest import read_manifest


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


def _check_samples(root: Path, manifest: dict, todo: list, entries: dict, rep: VerifyReport) -> None:
    """The samples table: its sha256, and every row against the tars' indexes (shard, split, bin, position,
    key, image offset and size), each indexed sample in exactly one row."""
    try:
        check_samples_table(root, manifest)
    except DatasetError as err:
        rep.problems.append(str(err))  # and still cross-check what rows can be read
    try:
        columns = ["key", "split", "bin", "shard", "position", "offset", "size"]
        rows = load_samples(root, columns=columns).to_pylist()
    except (DatasetError, FileNotFoundError) as err:
        if not any(str(root / SAMPLES) in p for p in rep.problems):
            rep.problems.append(str(err))
        return
    ext = extension(manifest["codec"]["name"])
    where = {s["path"]: (s["split"], b["name"]) for s, b in todo}
    seen: set[tuple[str, int]] = set()
    for n, row in enumerate(rows):
        problem = _row_problem(row, where, entries, ext)
        if problem:
            rep.problems.append(f"{SAMPLES} row {n} (key {row['key']}, shard {row['shard']}): {problem}")
        else:
            seen.add((row["shard"], row["position"]))
    for path, found in entries.items():
        missing = [e.key for pos, e in enumerate(found) if (path, pos) not in seen]
        if missing:
            rep.problems.append(f"{path}: {len(missing)} samples have no row in {SAMPLES}, e.g. {missing[0]}")


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
    entries, rows = {}, rows_by_shard(root)
    for shard, bin_ in progress(todo, desc="verify", unit="shard"):
        rep.shards += 1
        entries[shard["path"]] = _check_shard(
            root, shard, bin_, codec, quick_share if quick else 1.0, rng, rep, rows.get(shard["path"], {})
        )
    _check_samples(root, manifest, todo, entries, rep)
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
