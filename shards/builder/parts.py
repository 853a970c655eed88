"""The shard build: plan → parts (read, normalise, bin, resize, encode, write) → finalize.

A part is a fixed group of whole patients (see ``radstream.shards.builder.plan``). A task of a SLURM array builds the parts
``p`` with ``p % num_tasks == task_index``; a part's shards are named after it, so the dataset is identical
whatever the number of tasks. A finished part leaves ``OUT/_work/parts/part-NNNN.json``; a rerun skips it, and
a part that was killed half way is cleaned up and rebuilt from scratch (its shards only become visible by an
atomic rename, so nothing half written ever looks finished).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from multiprocessing import Pool
from pathlib import Path

import numpy as np

from radstream.bucketing.bins import Bin, BinningConfig, assign_with_config, fit_geometry
from radstream.bucketing.dataplan import stable_hash
from radstream.core.perms import restrict_umask
from radstream.core.progress import progress
from radstream.ingest.dicom import one_line
from radstream.ingest.errors import RejectError
from radstream.ingest.pipeline import IngestRecord
from radstream.ingest.privacy import Pseudonymizer, allowed_header
from radstream.ingest.readers import ReadConfig, decode_image
from radstream.shards.builder.config import BuildConfig, ShardConfig
from radstream.shards.builder.plan import BuildPlan, get_plan
from radstream.shards.builder.records import record_path, save_part
from radstream.shards.builder.resample import render_in_bin
from radstream.shards.builder.source import check_out_outside_source
from radstream.shards.builder.writer import ShardWriter
from radstream.shards.codecs import encode, extension

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Job:
    """What a worker needs to turn one source file into one encoded sample (picklable, set once per pool)."""

    read: ReadConfig
    bins: tuple[Bin, ...]
    binning: BinningConfig
    codec: str
    quality: int
    crop_to_foreground: bool


_JOB: _Job | None = None


def _init_worker(job: _Job) -> None:
    global _JOB
    _JOB = job


def sample_key(rel: str) -> str:
    """A webdataset key for a source path: readable stem + a hash of the full path (unique, no dots). Used only
    with privacy off: a file name can carry a patient's name (``ingest.privacy``)."""
    stem = re.sub(r"[^A-Za-z0-9_-]", "_", Path(rel).stem)[:48]
    return f"{stem}_{hashlib.sha1(rel.encode()).hexdigest()[:10]}"


def record_key(item: IngestRecord, cfg: BuildConfig) -> str:
    """The sample's key in tars, indexes and tables: its keyed path hash, or (privacy off) :func:`sample_key`."""
    return item.source_hash if cfg.ingest.privacy.enabled else sample_key(item.rel)


def process_item(item: IngestRecord) -> dict:
    """:func:`encode_item`, with any failure on this one file turned into its reject (the build goes on).

    Known bad input raises :class:`RejectError` with its reason. Anything else is a decoder or library failure
    on a file nobody anticipated: it is logged with its traceback and rejected naming the exception, because one
    strange file must not stop a build of a million.
    """
    try:
        return encode_item(item)
    except RejectError as err:
        return {"reject": str(err)}
    except Exception as err:  # noqa: BLE001 - the per-file boundary, see the docstring
        log.warning("%s: unexpected failure", item.rel, exc_info=True)
        return {"reject": f"unexpected {type(err).__name__} while reading: {one_line(err)}"}


def encode_item(item: IngestRecord) -> dict:
    """Decode → foreground box → pick the bin → shrink, normalise, resize → encode one input (in a worker).

    The full-size image is never turned into floats: the box is found on the stored numbers and
    :func:`radstream.shards.builder.resample.render_in_bin` normalises only the reduced image (see there).
    """
    job = _JOB
    assert job is not None, "worker not initialised"
    decoded = decode_image(item.path, job.read)
    height, width = decoded.values.shape
    box = decoded.foreground_box(job.read.foreground_tolerance)
    region = box if job.crop_to_foreground else (0, 0, height, width)
    y0, x0, y1, x1 = region
    size = np.array([[y1 - y0, x1 - x0]])
    bin_ = job.bins[int(assign_with_config(job.binning, size, job.bins)[0])]
    geom = fit_geometry(y1 - y0, x1 - x0, bin_, job.binning.fit)
    data = encode(render_in_bin(decoded, region, geom), job.codec, job.quality)
    box_in_region = (box[0] - y0, box[1] - x0, box[2] - y0, box[3] - x0)
    return {
        "bin": bin_.name,
        "data": data,
        "meta": decoded.meta,
        "foreground": [int(v) for v in box],
        "foreground_bin": [int(v) for v in geom.map_box(box_in_region)],
    }


def _sample_json(
    item: IngestRecord, res: dict, plan: BuildPlan, cfg: BuildConfig, psn: Pseudonymizer
) -> dict:
    """The ``.json`` member (and samples row): allow-listed header facts, the pseudonym and the path hash;
    the path itself only with privacy off."""
    header = allowed_header({"height": item.height, "width": item.width, **res["meta"]})
    kept = {"source": item.rel} if not cfg.ingest.privacy.enabled else {}
    return {
        **kept,
        "source_hash": item.source_hash,
        **header,
        "foreground": res["foreground"],
        "foreground_bin": res["foreground_bin"],
        "patient_id": item.patient,
        "split": item.split,
        "label": item.label,
        "label_index": plan.class_names.index(item.label) if item.label in plan.class_names else -1,
        "fractions": list(item.fractions),
        "bin": res["bin"],
        "fit": cfg.binning.fit,
        "cropped_to_foreground": cfg.shards.crop_to_foreground,
        "pixel_hash": psn.pixels(res["meta"].get("pixel_sha1")),
    }


def _clean_part(out: Path, part: int) -> None:
    """Remove what a killed run of this part left behind (final-named or partial shard files)."""
    pattern = re.compile(rf"^[a-z]+-\d+x\d+-{part:04d}-\d{{6}}\.(tar|idx)")
    for split_dir in (p for p in out.iterdir() if p.is_dir() and not p.name.startswith("_")):
        for f in split_dir.glob("*/*"):
            if pattern.match(f.name) or (f.name.startswith(".") and f"-{part:04d}-" in f.name):
                f.unlink()


def _results(items: list[IngestRecord], job: _Job, workers: int):
    """process_item over ``items``, in order, in this process or a pool of ``workers``."""
    if workers <= 1:
        _init_worker(job)
        yield from map(process_item, items)
        return
    with Pool(workers, initializer=_init_worker, initargs=(job,)) as pool:
        # Chunks of 4 keep the pipe traffic low; a smaller chunk did not shorten the tail (measured).
        yield from pool.imap(process_item, items, chunksize=4)


def _close_writers(writers: dict[tuple[str, str], ShardWriter]) -> list[dict]:
    """Close every (split, bin) writer; returns the part record's shard entries."""
    shards = []
    for (split, bin_name), writer in sorted(writers.items()):
        for info in writer.close():
            name = Path(info.path).name
            shards.append(
                {
                    "split": split,
                    "bin": bin_name,
                    "path": f"{split}/{bin_name}/{name}",
                    "samples": info.samples,
                    "bytes": info.bytes,
                    "sha256": info.sha256,
                }
            )
    return shards


def _writer(
    writers: dict[tuple[str, str], ShardWriter],
    out: Path,
    split: str,
    bin_name: str,
    part: int,
    sh: ShardConfig,
) -> ShardWriter:
    """The part's writer of (split, bin), opened on first use: ``OUT/<split>/<bin>/<split>-<bin>-<part>-*``."""
    if (split, bin_name) not in writers:
        folder = out / split / bin_name
        folder.mkdir(parents=True, exist_ok=True)
        writers[split, bin_name] = ShardWriter(
            folder,
            f"{split}-{bin_name}-{part:04d}",
            max_samples=sh.max_samples_per_shard,
            max_bytes=sh.max_shard_bytes,
        )
    return writers[split, bin_name]


def build_part(cfg: BuildConfig, plan: BuildPlan, part: int) -> dict:
    """Write every sample of one part; returns (and saves) the part record."""
    out = Path(cfg.out)
    _clean_part(out, part)
    items = sorted(plan.part_records(part), key=lambda it: stable_hash(cfg.seed, it.rel))
    sh = cfg.shards
    job = _Job(cfg.ingest.read, tuple(plan.bins), cfg.binning, sh.codec, sh.quality, sh.crop_to_foreground)
    writers: dict[tuple[str, str], ShardWriter] = {}
    psn = Pseudonymizer.from_config(cfg.ingest.privacy)
    rows, rejects, duplicates, seen_pixels = [], [], [], {}
    results = _results(items, job, cfg.workers)
    for item, res in progress(
        zip(items, results, strict=True), total=len(items), desc=f"part {part}", unit="img"
    ):
        if "reject" in res:
            rejects.append({"path": item.rel, "source_hash": item.source_hash, "reason": res["reject"]})
            continue
        sha = res["meta"].get("pixel_sha1")
        if sha in seen_pixels:
            first = seen_pixels[sha]
            duplicates.append(
                {
                    "path": item.rel,
                    "source_hash": item.source_hash,
                    "duplicate_of": first.rel,
                    "duplicate_of_hash": first.source_hash,
                }  # fmt: skip
            )
            continue
        seen_pixels[sha] = item
        key = record_key(item, cfg)
        meta = _sample_json(item, res, plan, cfg, psn)
        members = {extension(sh.codec): res["data"]}
        if meta["label_index"] >= 0:
            members["cls"] = str(meta["label_index"]).encode()
        members["json"] = json.dumps(meta, sort_keys=True).encode()
        _writer(writers, out, item.split, res["bin"], part, sh).write(key, members)
        rows.append({"key": key, **meta})
    shards = _close_writers(writers)
    record = {
        "part": part,
        "fingerprint": plan.fingerprint,
        "seen": len(items),
        "written": len(rows),
        "rejects": rejects,
        "duplicates": duplicates,
        "shards": shards,
    }
    save_part(out, record, rows)
    return record


def part_done(out: Path, part: int, fingerprint: str) -> bool:
    """A part is finished when its record exists and was made under the same plan."""
    path = record_path(out, part)
    if not path.is_file():
        return False
    try:
        with open(path) as fh:
            return json.load(fh).get("fingerprint") == fingerprint
    except (OSError, ValueError):
        return False


def run_build(
    cfg: BuildConfig,
    task_index: int = 0,
    num_tasks: int = 1,
    force_replan: bool = False,
    verify_source: bool = False,
) -> list[int]:
    """Build this task's parts (skipping finished ones); returns the parts built now.

    Raises:
        SourceChanged: ``OUT`` was planned from the same config over another source (with ``verify_source``,
            also same-size same-mtime bytes), and not ``force_replan`` (see ``radstream.shards.builder.plan.get_plan``).
        PlanChanged: ``OUT`` is a finished dataset built with other options (or whose ``_work/plan.json`` is
            missing or unreadable), and not ``force_replan``.
        ValueError: ``OUT`` lies inside the source folder, or the source folder inside ``OUT``.
    """
    if not 0 <= task_index < num_tasks:
        raise ValueError(f"task index {task_index} is outside 0..{num_tasks - 1}")
    check_out_outside_source(cfg)
    out = Path(cfg.out)
    restrict_umask()  # shards, indexes, tables: not readable by other users (radstream.core.perms)
    out.mkdir(parents=True, exist_ok=True)
    plan = get_plan(cfg, force_replan, verify_source, keep=lambda parts: parts % num_tasks == task_index)
    mine = [p for p in range(plan.num_parts) if p % num_tasks == task_index]
    if not mine:
        log.warning(
            "task %d of %d has no part to build (%d parts in all)", task_index, num_tasks, plan.num_parts
        )
    built = []
    for part in mine:
        if part_done(out, part, plan.fingerprint):
            log.info("part %d already built, skipped", part)
            continue
        start = time.perf_counter()
        rec = build_part(cfg, plan, part)
        secs = time.perf_counter() - start
        log.info(
            "part %d: %d written, %d rejected, %d duplicates in %.1f s (%.1f img/s)",
            part,
            rec["written"],
            len(rec["rejects"]),
            len(rec["duplicates"]),
            secs,
            rec["seen"] / max(secs, 1e-9),
        )
        built.append(part)
    return built


def build_dataset(
    cfg: BuildConfig,
    task_index: int = 0,
    num_tasks: int = 1,
    *,
    force_replan: bool = False,
    verify_source: bool = False,
    finalize_now: bool = True,
) -> dict | None:
    """Build this task's parts, then finalize the dataset (manifest, samples table): the one sequence of
    ``radstream build-shards`` and the study's shards stage. One task of several finalizes only with
    ``finalize_now`` (the others leave it to ``radstream finalize-shards``, run once all have ended).

    Returns:
        The manifest, or None when this task left finalizing to ``finalize-shards``.
    """
    from radstream.shards.builder.finalize import finalize

    run_build(cfg, task_index, num_tasks, force_replan, verify_source)
    if num_tasks > 1 and not finalize_now:
        return None
    return finalize(cfg)
