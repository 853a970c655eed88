"""Finalize a build: part records → ``manifest.json``, ``samples.parquet``, ``rejects.jsonl`` and
``duplicates.jsonl``.

The readers of those files are ``radstream.shards.manifest`` (any location) and ``radstream.shards.layout`` (a local folder).

Streaming, so that 10M samples finalize in a bounded memory (never a Python object per sample): each part's
rows (``radstream.shards.builder.parts`` writes them as Parquet beside its record) get their shard, position and image
member from the part's ``.idx`` files, are sorted in Arrow and written to a scratch file with one row group per
(split, bin); then the samples table is written (split, bin) after (split, bin), parts in shard-name order,
in row groups of at most ``ROW_GROUP_ROWS`` that never mix two (split, bin) (format 2.0: a reader of one
split reads only its row groups).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from radstream.core.atomic import write_bytes, write_with
from radstream.core.config import to_dict
from radstream.core.perms import restrict_umask
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.plan import BuildPlan, get_plan
from radstream.shards.builder.private import write_reject_lists
from radstream.shards.builder.records import part_rows, part_schema, record_path
from radstream.shards.index import read_index
from radstream.shards.layout import DUPLICATES, FORMAT_VERSION, MANIFEST, SAMPLES, SPLITS
from radstream.shards.subsets import stored_mask

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 1 << 20
"""Most rows per row group of the samples table (one (split, bin) per row group whatever its size)."""
CANDIDATE_ROWS = 1 << 19
"""Most candidate rows of the cross-part duplicate check held at once (two hashes a row, in Arrow)."""
SORT_KEYS = [("split", "ascending"), ("bin", "ascending"), ("shard", "ascending"), ("position", "ascending")]


class BuildIncomplete(RuntimeError):
    """Finalize was asked for before every part was built, or the counts do not add up."""


@dataclass
class _Totals:
    """What the manifest counts, gathered part by part."""

    written: int = 0
    per_bin: Counter = field(default_factory=Counter)
    """(bin, split) -> samples."""
    fractions: Counter = field(default_factory=Counter)
    pixel_prefix: list = field(default_factory=list)
    """Per chunk written, the first 64 bits of each row's pixel_hash (duplicate candidates)."""


def _load_parts(out: Path, plan: BuildPlan) -> list[dict]:
    parts, missing = [], []
    for part in range(plan.num_parts):
        path = record_path(out, part)
        rec = json.loads(path.read_text()) if path.is_file() else None
        if rec is None or rec.get("fingerprint") != plan.fingerprint:
            missing.append(part)
        else:
            parts.append(rec)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise BuildIncomplete(f"{out}: {len(missing)} of {plan.num_parts} parts not built yet ({shown})")
    return parts


def _placed(out: Path, rec: dict, rows: pa.Table, ext: str) -> pa.Table:
    """A part's rows with their shard, position and image member offset/size (from the part's indexes),
    sorted by (split, bin, shard, position)."""
    shard, pos, keys, offset, size = [], [], [], [], []
    for s in rec["shards"]:
        entries = read_index(out / s["path"].replace(".tar", ".idx"))
        shard += [s["path"]] * len(entries)
        pos.extend(range(len(entries)))
        keys += [e.key for e in entries]
        offset += [e.components[ext][0] for e in entries]
        size += [e.components[ext][1] for e in entries]
    where = pa.table({"key": pa.array(keys, pa.string()), "shard": pa.array(shard, pa.string()), "position":
                      pa.array(pos, pa.int64()), "offset": pa.array(offset, pa.int64()), "size": pa.array(size, pa.int64())})  # fmt: skip
    found = pc.index_in(rows["key"], value_set=where["key"])
    if found.null_count:
        lost = rows["key"].filter(pc.is_null(found))[0]
        raise BuildIncomplete(f"{out}: part {rec['part']}: sample {lost} is in no shard index of the part")
    taken = where.take(found)
    for name in ("shard", "position", "offset", "size"):
        rows = rows.append_column(name, taken[name])
    return rows.sort_by(SORT_KEYS)


def _pixel_prefix(column: pa.ChunkedArray) -> np.ndarray:
    """The first 16 hex digits of each pixel hash as uint64 (0 for none): duplicate candidates."""
    head = pc.utf8_slice_codeunits(column.fill_null(""), 0, 16).combine_chunks()
    digits = np.zeros((len(head), 16), np.uint64)
    lengths = pc.utf8_length(head).to_numpy(zero_copy_only=False)
    text = np.frombuffer(head.buffers()[2], np.uint8) if lengths.sum() else np.zeros(0, np.uint8)
    offsets = np.frombuffer(head.buffers()[1], np.int32)[head.offset : head.offset + len(head)]
    full = np.flatnonzero(lengths == 16)
    for j in range(16):
        c = text[offsets[full] + j].astype(np.uint64)
        digits[full, j] = np.where(c >= 97, c - 87, c - 48)
    return (digits << (np.arange(15, -1, -1, dtype=np.uint64) * 4)).sum(axis=1, dtype=np.uint64)


def _stage_parts(
    out: Path, cfg: BuildConfig, parts: list[dict], ext: str, scratch: Path
) -> tuple[pa.Schema, dict]:
    """Pass 1: each part placed and sorted into ``scratch`` (one row group per (split, bin)); returns the
    samples table's schema and, per (split, bin), the (part, row group) of its rows."""
    schemas = [schema for schema in (part_schema(out, rec) for rec in parts) if len(schema)]
    if not schemas:
        return pa.schema([]), {}
    schema = pa.unify_schemas(schemas, promote_options="permissive")
    for name, kind in (("shard", pa.string()), *((n, pa.int64()) for n in ("position", "offset", "size"))):
        schema = schema.append(pa.field(name, kind))
    groups: dict[tuple[str, str], list[tuple[int, int]]] = defaultdict(list)
    for rec in parts:
        rows = part_rows(out, rec)
        if not rows.num_rows:
            continue
        placed = _placed(out, rec, rows, ext).cast(schema)
        keys = pc.binary_join_element_wise(placed["split"], placed["bin"], "/").to_numpy(zero_copy_only=False)
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        with pq.ParquetWriter(scratch / f"part-{rec['part']:04d}.parquet", schema) as writer:
            for i, (a, b) in enumerate(zip(starts, [*starts[1:], len(keys)], strict=True)):
                writer.write_table(placed.slice(a, b - a), row_group_size=b - a)
                groups[tuple(keys[a].split("/"))].append((rec["part"], i))
    return schema, groups


def _write_samples(out: Path, schema: pa.Schema, groups: dict, scratch: Path, totals: _Totals, cfg) -> str:
    """Pass 2: the samples table, (split, bin) after (split, bin), parts in shard-name order; returns its
    sha256. Counts what the manifest needs on the way."""
    digest = hashlib.sha256()

    def write(fh) -> None:
        with pq.ParquetWriter(_Hashing(fh, digest), schema) as writer:
            for split, bin_name in sorted(groups):
                # a part's shards are named <split>-<bin>-<part:04d>-<n>: their names sort by this string
                order = sorted(groups[split, bin_name], key=lambda g: f"{g[0]:04d}-")
                chunks, held = [], 0
                for part, group in order:
                    chunk = pq.ParquetFile(scratch / f"part-{part:04d}.parquet").read_row_group(group)
                    _count(chunk, split, bin_name, totals, cfg)
                    chunks.append(chunk)
                    held += chunk.num_rows
                    if held >= ROW_GROUP_ROWS:
                        writer.write_table(pa.concat_tables(chunks), row_group_size=ROW_GROUP_ROWS)
                        chunks, held = [], 0
                if chunks:
                    writer.write_table(pa.concat_tables(chunks), row_group_size=ROW_GROUP_ROWS)

    if not groups:  # nothing written: an empty table, as before
        data = _empty_table()
        digest.update(data)
        write_bytes(out / SAMPLES, data)
    else:
        write_with(out / SAMPLES, write)
    return digest.hexdigest()


def _empty_table() -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({}), sink)
    return sink.getvalue().to_pybytes()


class _Hashing:
    """A binary file that hashes what is written through it (the table's sha256 without reading it back)."""

    def __init__(self, fh, digest) -> None:
        self.fh, self.digest, self.closed = fh, digest, False

    def write(self, data) -> int:
        self.digest.update(data)
        return self.fh.write(data)

    def tell(self) -> int:
        return self.fh.tell()

    def flush(self) -> None:
        self.fh.flush()

    def close(self) -> None:
        self.closed = True  # the real file is closed by its owner (write_with)


def _count(chunk: pa.Table, split: str, bin_name: str, totals: _Totals, cfg: BuildConfig) -> None:
    totals.written += chunk.num_rows
    totals.per_bin[bin_name, split] += chunk.num_rows
    for f in cfg.ingest.splits.label_fractions:
        totals.fractions[str(f)] += int(stored_mask(chunk["fractions"], f).sum())
    if "pixel_hash" in chunk.column_names:
        totals.pixel_prefix.append(_pixel_prefix(chunk["pixel_hash"]))


def finalize(cfg: BuildConfig) -> dict:
    """Merge every part into the dataset's manifest, samples table and rejects list; returns the manifest."""
    from radstream.shards.codecs import extension

    out = Path(cfg.out)
    restrict_umask()  # the dataset's files: not readable by other users (radstream.core.perms)
    plan = get_plan(cfg, keep=lambda parts: np.zeros(len(parts), bool))  # the counts, not the records
    parts = _load_parts(out, plan)
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["path"])
    early = [dataclasses.asdict(r) for r in plan.rejects]
    rejects = sorted(early + [r for p in parts for r in p["rejects"]], key=lambda r: r["source_hash"])
    duplicates = sorted((d for p in parts for d in p["duplicates"]), key=lambda d: d["source_hash"])
    written = sum(p["written"] if "written" in p else len(p["rows"]) for p in parts)
    if plan.seen != written + len(rejects) + len(duplicates):
        raise BuildIncomplete(
            f"count invariant broken: seen {plan.seen} != written {written} + rejected {len(rejects)} "
            f"+ duplicates {len(duplicates)}"
        )
    scratch = out / "_work" / "finalize"
    _remove(scratch)
    scratch.mkdir(parents=True)
    totals = _Totals()
    try:
        schema, groups = _stage_parts(out, cfg, parts, extension(cfg.shards.codec), scratch)
        samples_sha256 = _write_samples(out, schema, groups, scratch, totals, cfg)
        cross = _cross_part_duplicates(out, totals, scratch)
    finally:
        _remove(scratch)
    _write_rejects(out, rejects, duplicates, keep_paths=not cfg.ingest.privacy.enabled)
    manifest = _manifest(cfg, plan, totals, shards, rejects, duplicates, cross)
    manifest["samples_sha256"] = samples_sha256  # readers check the table against it
    write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _write_rejects(out: Path, rejects: list[dict], duplicates: list[dict], keep_paths: bool) -> None:
    """``rejects.jsonl`` (path hash and reason; the path too with privacy off) and its private twin with the
    paths (``radstream.shards.builder.private``)."""
    full = [{"source_hash": r["source_hash"], "path": r["path"], "reason": r["reason"]} for r in rejects]
    for d in duplicates:
        reason = f"duplicate of {d['duplicate_of'] if keep_paths else d['duplicate_of_hash']} (same pixels)"
        full.append({"source_hash": d["source_hash"], "path": d["path"], "reason": reason})
    write_reject_lists(out, full, keep_paths)


def _remove(scratch: Path) -> None:
    """The scratch folder and its files (flat: one file per part)."""
    for f in scratch.glob("*"):
        f.unlink()
    if scratch.exists():
        scratch.rmdir()


def _cross_part_duplicates(out: Path, totals: _Totals, scratch: Path) -> dict:
    """Same pixels in two parts (parts are deduplicated alone): reported in ``OUT/duplicates.jsonl`` (one
    group a line, ordered by pixel hash: ``{"pixel_hash", "source_hashes"}``), not silently dropped; returns the
    manifest's summary. Candidates share the first 64 bits of the pixel hash (by chance about N²/2⁶⁵ pairs:
    none at 10M); only their rows are read again, in Arrow, at most ``CANDIDATE_ROWS`` at a time, and only
    the groups found become Python objects."""
    prefixes = np.concatenate(totals.pixel_prefix) if totals.pixel_prefix else np.zeros(0, np.uint64)
    totals.pixel_prefix.clear()
    values, counts = np.unique(prefixes[prefixes != 0], return_counts=True)
    del prefixes
    candidates, counts = values[counts > 1], counts[counts > 1]
    # passes over the scratch files, each for a run of candidates of about CANDIDATE_ROWS rows at most
    ends = np.flatnonzero(np.diff((np.cumsum(counts) - 1) // CANDIDATE_ROWS)) + 1
    passes = np.split(candidates, ends) if len(candidates) else []
    files = sorted(scratch.glob("part-*.parquet"))
    summary = {"groups": 0, "samples": 0, "list": DUPLICATES}

    def write(fh) -> None:
        for wanted in passes:
            found = []
            for path in files:
                part = pq.read_table(path, columns=["pixel_hash", "source_hash"])
                prefix = _pixel_prefix(part["pixel_hash"])
                at = np.minimum(np.searchsorted(wanted, prefix), len(wanted) - 1)
                found.append(part.filter(pa.array(wanted[at] == prefix)))
            groups = pa.concat_tables(found).group_by("pixel_hash").aggregate([("source_hash", "list")])
            groups = groups.filter(pc.greater(pc.list_value_length(groups["source_hash_list"]), 1))
            for batch in groups.sort_by("pixel_hash").to_batches(max_chunksize=1 << 16):
                for group in batch.to_pylist():
                    hashes = sorted(group["source_hash_list"])
                    summary["groups"] += 1
                    summary["samples"] += len(hashes)
                    line = {"pixel_hash": group["pixel_hash"], "source_hashes": hashes}
                    fh.write(json.dumps(line).encode() + b"\n")

    write_with(out / DUPLICATES, write)
    if summary["groups"]:
        log.warning("%d groups of identical images sit in different parts; see %s", summary["groups"],
                    out / DUPLICATES)  # fmt: skip
    return summary


def _manifest(cfg, plan, totals: _Totals, shards, rejects, duplicates, cross) -> dict:
    from radstream.shards.codecs import bit_depth

    per_bin: dict[str, dict] = {
        b.name: {
            "name": b.name,
            "height": b.height,
            "width": b.width,
            "counts": dict.fromkeys(SPLITS, 0),
            "shards": [],
        }
        for b in plan.bins
    }
    for (bin_name, split), count in totals.per_bin.items():
        per_bin[bin_name]["counts"][split] += count
    for s in shards:
        per_bin[s["bin"]]["shards"].append({k: s[k] for k in ("path", "split", "samples", "bytes", "sha256")})
    split_sizes = Counter()
    for (_, split), count in totals.per_bin.items():
        split_sizes[split] += count
    fraction_sizes = {str(f): totals.fractions[str(f)] for f in cfg.ingest.splits.label_fractions}
    return {
        "format_version": FORMAT_VERSION,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "privacy": _privacy(plan.privacy, cfg),
        "class_names": list(plan.class_names),
        "codec": {
            "name": cfg.shards.codec,
            "quality": cfg.shards.quality,
            "bits": bit_depth(cfg.shards.codec),
        },
        "normalization": {"method": "min-max to [0, 1]", **to_dict(cfg.ingest.read)},
        "binning": to_dict(cfg.binning),
        "bins": [per_bin[b.name] for b in plan.bins if sum(per_bin[b.name]["counts"].values()) > 0],
        "split_sizes": {s: split_sizes.get(s, 0) for s in SPLITS},
        "label_fraction_sizes": fraction_sizes,
        "counts": {
            "seen": plan.seen,
            "written": totals.written,
            "rejected": len(rejects),
            "duplicates": len(duplicates),
        },
        "cross_part_duplicates": cross,
        "seed": cfg.seed,
        "fingerprint": plan.fingerprint,
        "config": public_config(cfg),
    }


def _privacy(summary: dict, cfg: BuildConfig) -> dict:
    """The manifest's privacy section: how patients and files are named, and (loudly) when they are not."""
    kept = summary.get("identifiers") == "kept" or not cfg.ingest.privacy.enabled
    section = {**summary, "identifiers": "kept" if kept else "pseudonymised"}
    if kept:
        section["warning"] = (
            "IDENTIFIERS KEPT: this dataset holds raw patient ids and source paths (ingest.privacy=off); "
            "publish it only if the data is public already"
        )
    return section


def public_config(cfg: BuildConfig) -> dict:
    """The recipe as the manifest carries it: every option, no path (the source, OUT, CSV lists, the key
    file are the build machine's business; the source is named by ``privacy.source_fingerprint``)."""
    values = to_dict(cfg)
    for name in ("source", "out"):
        values[name] = None
    for name in ("manifest_csv", "irma_csv"):
        values["ingest"][name] = "(private)" if values["ingest"][name] else None
    values["ingest"]["privacy"]["key_file"] = None
    return values
