"""The build plan: the ingest stage's records, the bins, and each record's part.

The plan is a pure function of the inputs and the config, so every task of a SLURM array computes the same one
independently; the first to finish writes it to ``OUT/_work/`` (atomically) and later tasks reuse it.
Labels, patients, splits and fractions come from ``radstream.ingest.pipeline``; this module adds binning and parts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from radstream.bucketing.bins import Bin, plan_bins
from radstream.bucketing.dataplan import assign_parts
from radstream.core.atomic import write_bytes
from radstream.core.config import load_config, to_dict, to_yaml
from radstream.core.locks import exclusive
from radstream.core.perms import private_folder
from radstream.ingest.pipeline import IngestRecord, NoUsableImages, Reject, run_ingest
from radstream.ingest.privacy import Pseudonymizer
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.private import write_identities, write_reject_lists
from radstream.shards.builder.source import config_differences, content_digest, source_digest
from radstream.shards.layout import MANIFEST, SAMPLES, SPLITS

log = logging.getLogger(__name__)

PLAN_VERSION = 3


class SourceChanged(ValueError):
    """The source differs from the one ``OUT`` was planned from (files added, removed or modified)."""


class PlanChanged(ValueError):
    """``OUT`` holds a finished dataset built with other options: a rerun would delete it."""


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
    privacy: dict = dataclasses.field(default_factory=dict)
    """The ingest's privacy summary for the manifest (``radstream.ingest.pipeline.IngestResult.privacy``)."""

    def part_records(self, part: int) -> list[IngestRecord]:
        """The records of one part, in plan order."""
        return [r for r, p in zip(self.records, self.parts, strict=True) if p == part]


def plan_fingerprint(cfg: BuildConfig) -> str:
    """Hash of every config value that changes the plan or the bytes written (not workers), and of the
    privacy key (another key, other pseudonyms: other splits and bytes)."""
    values = to_dict(cfg)
    values.pop("workers", None)
    values["ingest"]["privacy"].pop("key_file", None)  # where the key lies does not matter, which key does
    values["privacy_key_id"] = Pseudonymizer.from_config(cfg.ingest.privacy).key_id()
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def make_plan(cfg: BuildConfig, source: tuple[int, str]) -> BuildPlan:
    """Ingest the source (no pixel decoding), then plan the bins and cut whole patients into parts.

    Raises:
        ValueError: no usable image; ``OUT/rejects.jsonl`` lists why each input was rejected (its private twin
            the paths, ``radstream.shards.builder.private``), and the error its first lines.
    """
    try:
        ingested = run_ingest(cfg.source, cfg.ingest, seed=cfg.seed, workers=cfg.workers)
    except NoUsableImages as err:
        full = [dataclasses.asdict(r) for r in sorted(err.rejects, key=lambda r: r.path)]
        listed = write_reject_lists(Path(cfg.out), full, keep_paths=not cfg.ingest.privacy.enabled)
        first = "; ".join(f"{r.path}: {r.reason}" for r in err.rejects[:3])
        raise ValueError(
            f"{err}; all listed in {listed}, the first: {first}" if first else str(err)
        ) from None
    write_identities(Path(cfg.out), ingested.identities, cfg.source)
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
        fingerprint=_combined(plan_fingerprint(cfg), source),
        privacy=ingested.privacy,
    )


def _combined(config_fingerprint: str, source: tuple[int, str]) -> str:
    """The plan's fingerprint: its config and its source (a part built for another source is not done)."""
    return hashlib.sha256(f"{config_fingerprint}|{source[1]}".encode()).hexdigest()[:16]


def save_plan(
    plan: BuildPlan, work_dir: Path, cfg: BuildConfig, source: tuple[int, str], content: str | None = None
) -> None:
    """Write ``plan.json`` (small fields) and ``plan.parquet`` (one row per record), each atomically."""
    private_folder(work_dir)  # paths and ids: the data steward's only
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
        "config_fingerprint": plan_fingerprint(cfg),
        "source": {"files": source[0], "digest": source[1], "content": content},
        "class_names": list(plan.class_names),
        "bins": [b.name for b in plan.bins],
        "rejects": [dataclasses.asdict(r) for r in plan.rejects],
        "seen": plan.seen,
        "num_parts": plan.num_parts,
        "privacy": plan.privacy,
    }
    write_bytes(work_dir / "plan.json", json.dumps(head, indent=1).encode())


def _record(row: dict) -> IngestRecord:
    row.pop("part")
    return IngestRecord(**{**row, "fractions": tuple(row["fractions"])})


Keep = Callable[[np.ndarray], np.ndarray]
"""Which records a task loads: the parts of a batch of records → True for those to keep."""


def _records(path: Path, keep: Keep | None) -> list[dict]:
    """The plan's rows (all, or those ``keep`` selects by part, read batch by batch so that the records of
    other tasks never become Python objects)."""
    if keep is None:
        return pq.read_table(path).to_pylist()
    rows = []
    for batch in pq.ParquetFile(path).iter_batches():
        mask = keep(batch.column("part").to_numpy(zero_copy_only=False))
        if mask.any():
            rows += batch.filter(pa.array(mask)).to_pylist()
    return rows


def load_plan(work_dir: Path, fingerprint: str, keep: Keep | None = None) -> BuildPlan | None:
    """The saved plan if it was made with the same config, else None; with ``keep``, only the records of
    the parts it selects (``records`` and ``parts`` then hold those alone)."""
    try:
        head = json.loads((work_dir / "plan.json").read_text())
        if head.get("version") != PLAN_VERSION or head.get("fingerprint") != fingerprint:
            return None
        rows = _records(work_dir / "plan.parquet", keep)
    except (OSError, ValueError, pa.ArrowException):
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
        privacy=head.get("privacy", {}),
    )


def _planning_lock(work_dir: Path) -> contextlib.AbstractContextManager[None]:
    """One task of an array plans at a time: the others wait here, then find its plan saved. The tasks run
    on many nodes: ``radstream.core.locks.exclusive`` holds between them (or says why it cannot)."""
    work_dir.mkdir(parents=True, exist_ok=True)
    return exclusive(work_dir / "plan.lock")


def _only(plan: BuildPlan, keep: Keep | None) -> BuildPlan:
    """``plan`` with only the records ``keep`` selects (the planner, too, keeps only its parts' records)."""
    if keep is None:
        return plan
    kept = np.flatnonzero(keep(np.asarray(plan.parts, dtype=np.int64))).tolist()
    return dataclasses.replace(
        plan, records=tuple(plan.records[i] for i in kept), parts=tuple(plan.parts[i] for i in kept)
    )


def get_plan(
    cfg: BuildConfig, force_replan: bool = False, verify_source: bool = False, keep: Keep | None = None
) -> BuildPlan:
    """Load the plan from ``OUT/_work`` or make and save it.

    Tasks of an array starting together plan once: the first takes the planning lock and ingests the source,
    the others wait for it and load the saved plan; each keeps only the records ``keep`` selects (its parts;
    none for finalize), and only the planner ever held them all.

    A plan made from the same config but another source (files added, removed or modified since; with
    ``verify_source`` also bytes rewritten in place) is refused with :class:`SourceChanged`, and a finished
    dataset made with other options with :class:`PlanChanged`, unless ``force_replan``: then the old build is
    dropped (manifest first, so no reader takes it for finished) and every part is built again. A finished
    dataset whose ``_work/plan.json`` is missing or unreadable is refused the same way (nothing says what it
    was built from). An unfinished build of another config is replaced without asking (nothing of value is lost).
    Within one SLURM array job (``$SLURM_ARRAY_JOB_ID``) the source is listed once, by the first task to take
    the lock; the others trust its digest (a file changed while the job runs is seen by the next job).
    """
    work_dir = Path(cfg.out) / "_work"
    content = content_digest(cfg) if verify_source else None
    job = os.environ.get("SLURM_ARRAY_JOB_ID") or None
    with _planning_lock(work_dir):
        source = _job_source(work_dir, job) or source_digest(cfg)
        plan = load_plan(work_dir, _combined(plan_fingerprint(cfg), source), keep)
        if plan is not None and content is not None:
            plan = _check_content(plan, cfg, content, force_replan)
        if plan is not None:
            _mark_job(work_dir, job)
            return plan
        plan = _replan(cfg, source, content, force_replan)
        _mark_job(work_dir, job)
        return _only(plan, keep)


def _job_source(work_dir: Path, job: str | None) -> tuple[int, str] | None:
    """The source digest a task of the same SLURM array job already took (recorded in ``plan.json`` by
    :func:`_mark_job`): the source is listed and statted once per job, not once per task (10M files on a
    shared filesystem, times a thousand tasks). None: not in an array job, or none of its tasks came first."""
    head = _saved_head(work_dir) if job else None
    if head is None or head.get("job") != job:
        return None
    return head["source"]["files"], head["source"]["digest"]


def _mark_job(work_dir: Path, job: str | None) -> None:
    """Record in ``plan.json`` that array job ``job`` checked the source against this plan (see
    :func:`_job_source`); a later job, a rerun, checks it again."""
    head = _saved_head(work_dir) if job else None
    if head is not None and head.get("job") != job:
        write_bytes(work_dir / "plan.json", json.dumps({**head, "job": job}, indent=1).encode())


def _replan(cfg: BuildConfig, source: tuple[int, str], content: str | None, force_replan: bool) -> BuildPlan:
    out = Path(cfg.out)
    work_dir = out / "_work"
    old = _saved_head(work_dir)
    if old is not None:
        _check_same_key(old, cfg, force_replan)  # first: the most specific reason
        if not force_replan:
            _refuse_replacing(cfg, old, source)
    elif (out / MANIFEST).is_file() and not force_replan:
        raise PlanChanged(
            f"{out}: a finished dataset whose build record {work_dir / 'plan.json'} is missing or unreadable, "
            "so this run cannot tell whether it would rebuild it with other options; build into a new OUT, or "
            "rerun with --force-replan to replace it"
        )
    if old is not None or (out / MANIFEST).is_file():
        _drop_old_build(out)
    plan = make_plan(cfg, source)
    save_plan(plan, work_dir, cfg, source, content)
    write_bytes(work_dir / "config.yaml", to_yaml(cfg).encode())
    log.info(
        "plan: %d images in %d parts, %d bins, %d rejected early",
        len(plan.records),
        plan.num_parts,
        len(plan.bins),
        len(plan.rejects),
    )
    return plan


def _check_same_key(old: dict, cfg: BuildConfig, force_replan: bool) -> None:
    """A task with another privacy key than the one ``OUT`` was planned with must not drop the build (the
    usual cause: tasks of an array that do not see the same key file).

    Raises:
        ValueError: another key, and not ``force_replan``.
    """
    theirs = old.get("privacy", {}).get("key_id")
    mine = Pseudonymizer.from_config(cfg.ingest.privacy).key_id()
    if theirs and mine and theirs != mine and not force_replan:
        raise ValueError(
            f"{cfg.out} was planned under another privacy key (id {theirs}, this task's is {mine}): give every "
            "task the same key file (ingest.privacy.key_file or $RADSTREAM_PRIVACY_KEY_FILE on shared storage), "
            "or rerun with --force-replan to rebuild under this key"
        )


def _check_content(plan: BuildPlan, cfg: BuildConfig, content: str, force_replan: bool) -> BuildPlan | None:
    """``--verify-source`` on a plan whose stat digest matches: the plan if the bytes match too (or were not
    recorded: then they are recorded now), None to replan under ``force_replan``, else :class:`SourceChanged`."""
    work_dir = Path(cfg.out) / "_work"
    head = _saved_head(work_dir) or {}
    saved = head.get("source", {}).get("content")
    if saved == content:
        return plan
    if saved is None:
        log.warning(
            "%s was planned without --verify-source: the bytes of its source are recorded now, and later runs "
            "with --verify-source compare against them (a rewrite before now cannot be seen)",
            cfg.out,
        )
        head["source"]["content"] = content
        write_bytes(work_dir / "plan.json", json.dumps(head, indent=1).encode())
        return plan
    if force_replan:
        return None
    raise SourceChanged(
        f"{cfg.source}: the bytes of the source changed since {cfg.out} was planned (same names, sizes and "
        "modification times: a file was rewritten in place); build into a new OUT, or rerun with "
        "--force-replan to rebuild this one"
    )


def _refuse_replacing(cfg: BuildConfig, old: dict, source: tuple[int, str]) -> None:
    """Raise unless the build in OUT may be dropped: its source changed (:class:`SourceChanged`), or it is a
    finished dataset made with other options (:class:`PlanChanged`, naming them)."""
    out = Path(cfg.out)
    if old.get("config_fingerprint") == plan_fingerprint(cfg):
        then = old.get("source", {}).get("files", "?")
        raise SourceChanged(
            f"{cfg.source}: the source changed since {out} was planned ({then} files then, {source[0]} now, "
            "or files modified); build into a new OUT, or rerun with --force-replan to rebuild this one"
        )
    if (out / MANIFEST).is_file():
        try:
            before = load_plan_config(out)
        except (OSError, ValueError):
            before = None
        raise PlanChanged(
            f"{out}: a finished dataset built with other options ({config_differences(before, cfg)}); "
            "build into a new OUT, or rerun with --force-replan to replace it"
        )


def _saved_head(work_dir: Path) -> dict | None:
    try:
        return json.loads((work_dir / "plan.json").read_text())
    except (OSError, ValueError):
        return None


def _drop_old_build(out: Path) -> None:
    """Remove a build made under another plan: the manifest first (the dataset stops looking finished), then
    the samples table, part records and shards (all rebuilt under the new plan)."""
    log.warning("%s was built under another plan (config or source changed): rebuilding it", out)
    for name in (MANIFEST, SAMPLES):
        (out / name).unlink(missing_ok=True)
    for record in (out / "_work" / "parts").glob("part-*.*"):  # records and their rows
        record.unlink()
    for split in SPLITS:
        for f in (out / split).glob("*/*"):
            if f.suffix in (".tar", ".idx") or f.name.startswith("."):  # hidden: half-written shards
                f.unlink()


def load_plan_config(out: str | Path) -> BuildConfig:
    """The resolved build config a dataset was planned with (for finalize and later reruns)."""
    path = Path(out) / "_work" / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no build config here (has `radstream build-shards` run on {out}?)")
    return load_config(BuildConfig, path)
