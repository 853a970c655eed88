"""The build plan: every input's label, patient, split, label fractions, part, plus the bins.

The plan is a pure function of the inputs and the config, so every task of a SLURM array computes the same one
independently; the first to finish writes it to ``OUT/_work/`` (atomically) and later tasks reuse it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from bucketing.bins import Bin, plan_bins
from core.atomic import write_bytes
from core.config import load_config, to_dict, to_yaml
from ingest.labels import class_names_for
from ingest.scan import scan_one
from ingest.sources import SourceItem, discover
from ingest.splits import assign_splits, label_fractions
from shards.config import BuildConfig

log = logging.getLogger(__name__)

PLAN_VERSION = 1
# A header read takes about 0.1 ms on a local disk and a process pool about 20 ms to start: below this many
# files a pool makes the scan slower, not faster.
SCAN_POOL_MIN_FILES = 500


@dataclass
class BuildPlan:
    """Everything a part needs to write its shards, identical for every task."""

    class_names: list[str]
    bins: list[Bin]
    items: list[dict]
    """Per kept input: path (absolute), rel (relative to the source), label, patient, height, width, format,
    split, fractions, part."""
    rejects: list[dict]
    """Inputs rejected before decoding: {path, reason}."""
    seen: int
    num_parts: int
    fingerprint: str
    extra: dict = field(default_factory=dict)


def stable_hash(*parts: object) -> int:
    """A 64-bit hash that does not depend on Python's hash randomisation."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def plan_fingerprint(cfg: BuildConfig) -> str:
    """Hash of every config value that changes the plan or the bytes written (not workers)."""
    values = to_dict(cfg)
    values.pop("workers", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def _rel(resolved: Path, root: Path) -> str:
    try:
        return str(resolved.relative_to(root))
    except ValueError:
        return str(resolved)


def _patient(item: SourceItem, head_pid: str | None, rel: str, how: str) -> str:
    if item.patient_id:
        return item.patient_id
    if how in ("auto", "dicom") and head_pid:
        return f"dicom:{head_pid}"
    if how == "parent":
        return f"dir:{Path(rel).parent}"
    return f"file:{rel}"


def scan_sources(items: list[SourceItem], cfg: BuildConfig) -> list[tuple]:
    """Header-scan every item (in parallel with cfg.workers): per item (HeaderInfo, None) or (None, reason)."""
    args = [(it.path, cfg.ingest.read) for it in items]
    bar = dict(total=len(args), desc="scan headers", unit="img", disable=None)
    if cfg.workers > 1 and len(args) >= SCAN_POOL_MIN_FILES:
        with Pool(cfg.workers) as pool:
            return list(tqdm(pool.imap(scan_one, args, chunksize=64), **bar))
    return [scan_one(a) for a in tqdm(args, **bar)]


def _assign_parts(patients: list[str], part_size: int, seed: int) -> np.ndarray:
    """Cut whole patients into parts of about ``part_size`` images, independent of the number of tasks."""
    unique, inverse, sizes = np.unique(
        np.array(patients, dtype=object), return_inverse=True, return_counts=True
    )
    order = sorted(range(len(unique)), key=lambda i: stable_hash("part", seed, unique[i]))
    part_of_patient = np.zeros(len(unique), dtype=np.int64)
    part, filled = 0, 0
    for i in order:
        if filled >= part_size:
            part, filled = part + 1, 0
        part_of_patient[i] = part
        filled += int(sizes[i])
    return part_of_patient[inverse]


def make_plan(cfg: BuildConfig) -> BuildPlan:
    """Discover, scan, label, split and bin every input (no pixel decoding)."""
    root = Path(cfg.source).resolve()
    ing = cfg.ingest
    found, rejects = discover(
        str(root),
        manifest_csv=ing.manifest_csv,
        label_from=ing.labels,
        irma_csv=ing.irma_csv,
        drop_labels=tuple(ing.drop_labels),
    )
    seen = len(found) + len(rejects)
    items: list[dict] = []
    for item, (head, reason) in zip(found, scan_sources(found, cfg), strict=True):
        resolved = Path(item.path).resolve()
        rel = _rel(resolved, root)
        if head is None:
            rejects.append({"path": rel, "reason": reason})
            continue
        items.append(
            {
                "path": str(resolved),
                "rel": rel,
                "label": item.label,
                "patient": _patient(item, head.patient_id, rel, ing.patient_from),
                "height": head.height,
                "width": head.width,
                "format": head.format,
            }
        )
    if not items:
        raise ValueError(f"{root}: no usable images found ({len(rejects)} rejected)")
    labels = [it["label"] for it in items]
    patients = [it["patient"] for it in items]
    sp = ing.splits
    counts = tuple(sp.counts) if sp.counts is not None else None
    splits = assign_splits(
        labels, patients, seed=cfg.seed, counts=counts, fractions=None if counts else tuple(sp.fractions)
    )
    fracs = label_fractions(labels, splits, fractions=tuple(sp.label_fractions), seed=cfg.seed)
    kept = []
    for it, split, frac in zip(items, splits, fracs, strict=True):
        if split == "unused":
            rejects.append(
                {"path": it["rel"], "reason": f"outside the requested split counts {list(counts)}"}
            )
            continue
        it["split"], it["fractions"] = split, list(frac)
        kept.append(it)
    sizes = np.array([[it["height"], it["width"]] for it in kept], dtype=np.int64)
    bins = plan_bins(cfg.binning, sizes)
    parts = _assign_parts([it["patient"] for it in kept], cfg.shards.part_size, cfg.seed)
    for it, part in zip(kept, parts, strict=True):
        it["part"] = int(part)
    class_names = class_names_for(ing.labels, [it["label"] for it in kept], drop=tuple(ing.drop_labels))
    return BuildPlan(
        class_names=list(class_names),
        bins=list(bins),
        items=kept,
        rejects=rejects,
        seen=seen,
        num_parts=int(parts.max()) + 1 if len(parts) else 0,
        fingerprint=plan_fingerprint(cfg),
    )


def save_plan(plan: BuildPlan, work_dir: Path) -> None:
    """Write ``plan.json`` (small fields) and ``plan.parquet`` (one row per item), each atomically."""
    work_dir.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(plan.items)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    write_bytes(work_dir / "plan.parquet", sink.getvalue().to_pybytes())
    head = {
        "version": PLAN_VERSION,
        "fingerprint": plan.fingerprint,
        "class_names": plan.class_names,
        "bins": [b.name for b in plan.bins],
        "rejects": plan.rejects,
        "seen": plan.seen,
        "num_parts": plan.num_parts,
    }
    write_bytes(work_dir / "plan.json", json.dumps(head, indent=1).encode())


def load_plan(work_dir: Path, fingerprint: str) -> BuildPlan | None:
    """The saved plan if it was made with the same config, else None."""
    try:
        head = json.loads((work_dir / "plan.json").read_text())
        if head.get("version") != PLAN_VERSION or head.get("fingerprint") != fingerprint:
            return None
        items = pq.read_table(work_dir / "plan.parquet").to_pylist()
    except (OSError, ValueError):
        return None
    return BuildPlan(
        class_names=head["class_names"],
        bins=[Bin.parse(b) for b in head["bins"]],
        items=items,
        rejects=head["rejects"],
        seen=head["seen"],
        num_parts=head["num_parts"],
        fingerprint=fingerprint,
    )


def get_plan(cfg: BuildConfig) -> BuildPlan:
    """Load the plan from ``OUT/_work`` or make and save it."""
    work_dir = Path(cfg.out) / "_work"
    fingerprint = plan_fingerprint(cfg)
    plan = load_plan(work_dir, fingerprint)
    if plan is None:
        plan = make_plan(cfg)
        save_plan(plan, work_dir)
        write_bytes(work_dir / "config.yaml", to_yaml(cfg).encode())
        log.info(
            "plan: %d images in %d parts, %d bins, %d rejected early",
            len(plan.items),
            plan.num_parts,
            len(plan.bins),
            len(plan.rejects),
        )
    return plan


def load_plan_config(out: str | Path) -> BuildConfig:
    """The resolved build config a dataset was planned with (for finalize and later reruns)."""
    path = Path(out) / "_work" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no build config here (has `radstream build-shards` run on {out}?)")
    return load_config(BuildConfig, path)
