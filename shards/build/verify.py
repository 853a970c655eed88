"""`radstream verify-shards`: re-read a dataset and check it against its manifest."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from core.progress import progress
from shards.codecs import decode
from shards.index import ShardReader, read_index, verify_index
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check_shard(root: Path, shard: dict, bin_: dict, codec: str, decode_share: float, rng, rep) -> None:
    tar = root / shard["path"]
    idx = tar.with_suffix(".idx")
    if not tar.is_file() or not idx.is_file():
        rep.problems.append(f"{shard['path']}: missing {'tar' if not tar.is_file() else '.idx'}")
        return
    size = tar.stat().st_size
    rep.bytes += size
    if size != shard["bytes"]:
        rep.problems.append(f"{shard['path']}: {size} bytes, manifest says {shard['bytes']}")
    if _sha256(tar) != shard["sha256"]:
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
    meta = json.loads(members.get("json", b"{}"))
    if meta.get("bin") not in (None, bin_["name"]):
        rep.problems.append(f"{where}: sample {entry.key} says bin {meta.get('bin')}")


def verify_shards(
    root: str | Path, quick: bool = False, quick_share: float = 0.05, seed: int = 0
) -> VerifyReport:
    """Check every shard: bytes, sha256 and sample count against the manifest, the ``.idx`` against the tar,
    and that images decode to their bin's shape (all of them, or a ``quick_share`` sample with ``quick``)."""
    root = Path(root)
    manifest = read_manifest(root)
    codec = manifest["codec"]["name"]
    rng = random.Random(seed)
    rep = VerifyReport()
    todo = [(s, b) for b in manifest["bins"] for s in b["shards"]]
    for shard, bin_ in progress(todo, desc="verify", unit="shard"):
        rep.shards += 1
        _check_shard(root, shard, bin_, codec, quick_share if quick else 1.0, rng, rep)
    written = manifest["counts"]["written"]
    if rep.samples != written:
        rep.problems.append(f"manifest: {written} samples written, shards hold {rep.samples}")
    counts = manifest["counts"]
    if counts["seen"] != counts["written"] + counts["rejected"] + counts["duplicates"]:
        rep.problems.append(f"manifest: count invariant broken {counts}")
    return rep
