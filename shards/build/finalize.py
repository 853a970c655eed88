"""Finalize a build: part records → ``manifest.json``, ``samples.parquet`` and ``rejects.jsonl``.

The readers of those files are ``shards.manifest`` (any location) and ``shards.layout`` (a local folder).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
from collections import Counter, defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from core.atomic import write_bytes
from core.config import to_dict
from core.perms import restrict_umask
from shards.build.config import BuildConfig
from shards.build.plan import BuildPlan, get_plan
from shards.build.private import write_reject_lists
from shards.index import read_index
from shards.layout import FORMAT_VERSION, MANIFEST, SAMPLES, SPLITS

log = logging.getLogger(__name__)


class BuildIncomplete(RuntimeError):
    """Finalize was asked for before every part was built, or the counts do not add up."""


def _load_parts(out: Path, plan: BuildPlan) -> list[dict]:
    parts, missing = [], []
    for part in range(plan.num_parts):
        path = out / "_work" / "parts" / f"part-{part:04d}.json"
        rec = json.loads(path.read_text()) if path.is_file() else None
        if rec is None or rec.get("fingerprint") != plan.fingerprint:
            missing.append(part)
        else:
            parts.append(rec)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" …" if len(missing) > 10 else "")
        raise BuildIncomplete(f"{out}: {len(missing)} of {plan.num_parts} parts not built yet ({shown})")
    return parts


def _with_offsets(out: Path, rows: list[dict], shards: list[dict], ext: str) -> list[dict]:
    """Attach each sample's shard, position and image member offset/size (from the DALI index)."""
    where = {}
    for shard in shards:
        idx = out / shard["path"].replace(".tar", ".idx")
        for pos, entry in enumerate(read_index(idx)):
            offset, size = entry.components[ext]
            where[entry.key] = (shard["path"], pos, offset, size)
    for row in rows:
        row["shard"], row["position"], row["offset"], row["size"] = where[row["key"]]
    return rows


def finalize(cfg: BuildConfig) -> dict:
    """Merge every part into the dataset's manifest, samples table and rejects list; returns the manifest."""
    from shards.codecs import extension

    out = Path(cfg.out)
    restrict_umask()  # the dataset's files: not readable by other users (core.perms)
    plan = get_plan(cfg)
    parts = _load_parts(out, plan)
    shards = sorted((s for p in parts for s in p["shards"]), key=lambda s: s["path"])
    rows = [r for p in parts for r in p["rows"]]
    rows = _with_offsets(out, rows, shards, extension(cfg.shards.codec))
    rows.sort(key=lambda r: (r["split"], r["bin"], r["shard"], r["position"]))
    early = [dataclasses.asdict(r) for r in plan.rejects]
    rejects = sorted(early + [r for p in parts for r in p["rejects"]], key=lambda r: r["source_hash"])
    duplicates = sorted((d for p in parts for d in p["duplicates"]), key=lambda d: d["source_hash"])
    seen = plan.seen
    if seen != len(rows) + len(rejects) + len(duplicates):
        raise BuildIncomplete(
            f"count invariant broken: seen {seen} != written {len(rows)} + rejected {len(rejects)} "
            f"+ duplicates {len(duplicates)}"
        )
    cross = _cross_part_duplicates(rows)
    table = pa.Table.from_pylist(rows)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    samples = sink.getvalue().to_pybytes()
    write_bytes(out / SAMPLES, samples)
    _write_rejects(out, rejects, duplicates, keep_paths=not cfg.ingest.privacy.enabled)
    manifest = _manifest(cfg, plan, rows, shards, rejects, duplicates, cross)
    manifest["samples_sha256"] = hashlib.sha256(samples).hexdigest()  # readers check the table against it
    write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def _write_rejects(out: Path, rejects: list[dict], duplicates: list[dict], keep_paths: bool) -> None:
    """``rejects.jsonl`` (path hash and reason; the path too with privacy off) and its private twin with the
    paths (``shards.build.private``)."""
    full = [{"source_hash": r["source_hash"], "path": r["path"], "reason": r["reason"]} for r in rejects]
    for d in duplicates:
        reason = f"duplicate of {d['duplicate_of'] if keep_paths else d['duplicate_of_hash']} (same pixels)"
        full.append({"source_hash": d["source_hash"], "path": d["path"], "reason": reason})
    write_reject_lists(out, full, keep_paths)


def _cross_part_duplicates(rows: list[dict]) -> list[list[str]]:
    """Same pixels in two parts (parts are deduplicated alone): reported, not silently dropped."""
    by_sha = defaultdict(list)
    for r in rows:
        if r.get("pixel_hash"):
            by_sha[r["pixel_hash"]].append(r["source_hash"])
    groups = [sorted(v) for v in by_sha.values() if len(v) > 1]
    if groups:
        log.warning(
            "%d groups of identical images sit in different parts; see manifest 'cross_part_duplicates'",
            len(groups),
        )
    return sorted(groups)


def _manifest(cfg, plan, rows, shards, rejects, duplicates, cross) -> dict:
    from shards.codecs import bit_depth

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
    for r in rows:
        per_bin[r["bin"]]["counts"][r["split"]] += 1
    for s in shards:
        per_bin[s["bin"]]["shards"].append({k: s[k] for k in ("path", "split", "samples", "bytes", "sha256")})
    split_sizes = Counter(r["split"] for r in rows)
    fraction_sizes = {
        str(f): sum(1 for r in rows if f in r["fractions"]) for f in cfg.ingest.splits.label_fractions
    }
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
            "written": len(rows),
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
