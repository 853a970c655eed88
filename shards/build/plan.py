"""The build plan: the ingest stage's records, the bins, and each record's part.

The plan is a pure function of the inputs and the config, so every task of a SLURM array computes the same one
independently; the first to finish writes it to ``OUT/_work/`` (atomically) and later tasks reuse it.
Labels, patients, splits and fractions come from ``ingest.stage``; this module adds binning and parts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from bucketing.bins import Bin, plan_bins
from bucketing.dataplan import assign_parts
from core.atomic import write_bytes
from core.config import load_config, to_dict, to_yaml
from ingest.stage import IngestRecord, Reject, run_ingest
from shards.build.config import BuildConfig

log = logging.getLogger(__name__)

PLAN_VERSION = 1


@dataclass(frozen=True)
class BuildPlan:
    """Everything a part needs to write its shards, identical for every task."""

    class_names: tuple[str, ...]
    bins: tuple[Bin, ...]
    records: tuple[IngestRecord, ...]
    """Every kept input, in the ingest stage's order."""
    parts: tuple[int, ...]
    """The part of each record."""
    rejects: tuple[Reject, ...]
    """Inputs rejected before decoding."""
    seen: int
    num_parts: int
    fingerprint: str

    def part_records(self, part: int) -> list[IngestRecord]:
        """The records of one part, in plan order."""
        return [r for r, p in zip(self.records, self.parts, strict=True) if p == part]


def plan_fingerprint(cfg: BuildConfig) -> str:
    """Hash of every config value that changes the plan or the bytes written (not workers)."""
    values = to_dict(cfg)
    values.pop("workers", None)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(cfg: BuildConfig) -> BuildPlan:
    """Ingest the source (no pixel decoding), then plan the bins and cut whole patients into parts."""
    ingested = run_ingest(cfg.source, cfg.ingest, seed=cfg.seed, workers=cfg.workers)
    records = ingested.records
    sizes = np.array([[r.height, r.width] for r in records], dtype=np.int64).reshape(-1, 2)
    parts = assign_parts([r.patient for r in records], cfg.shards.part_size, cfg.seed)
    return BuildPlan(
        class_names=ingested.class_names,
        bins=tuple(plan_bins(cfg.binning, sizes)),
        records=records,
        parts=tuple(int(p) for p in parts),
        rejects=ingested.rejects,
        seen=ingested.seen,
        num_parts=int(parts.max()) + 1 if len(parts) else 0,
        fingerprint=plan_fingerprint(cfg),
    )


def save_plan(plan: BuildPlan, work_dir: Path) -> None:
    """Write ``plan.json`` (small fields) and ``plan.parquet`` (one row per record), each atomically."""
    work_dir.mkdir(parents=True, exist_ok=True)
    rows = [
        {**dataclasses.asdict(r), "fractions": list(r.fractions), "part": p}
        for r, p in zip(plan.records, plan.parts, strict=True)
    ]
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(rows), sink)
    write_bytes(work_dir / "plan.parquet", sink.getvalue().to_pybytes())
    head = {
        "version": PLAN_VERSION,
        "fingerprint": plan.fingerprint,
        "class_names": list(plan.class_names),
        "bins": [b.name for b in plan.bins],
        "rejects": [dataclasses.asdict(r) for r in plan.rejects],
        "seen": plan.seen,
        "num_parts": plan.num_parts,
    }
    write_bytes(work_dir / "plan.json", json.dumps(head, indent=1).encode())


def _record(row: dict) -> IngestRecord:
    row.pop("part")
    return IngestRecord(**{**row, "fractions": tuple(row["fractions"])})


def load_plan(work_dir: Path, fingerprint: str) -> BuildPlan | None:
    """The saved plan if it was made with the same config, else None."""
    try:
        head = json.loads((work_dir / "plan.json").read_text())
        if head.get("version") != PLAN_VERSION or head.get("fingerprint") != fingerprint:
            return None
        rows = pq.read_table(work_dir / "plan.parquet").to_pylist()
    except (OSError, ValueError):
        return None
    return BuildPlan(
        class_names=tuple(head["class_names"]),
        bins=tuple(Bin.parse(b) for b in head["bins"]),
        records=tuple(_record(dict(row)) for row in rows),
        parts=tuple(int(row["part"]) for row in rows),
        rejects=tuple(Reject(**r) for r in head["rejects"]),
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
            len(plan.records),
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
