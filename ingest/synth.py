"""The synthetic radiograph corpus: the project's embedded default data (no real image may be downloaded).

``synthesize(out_dir, n, seed)`` writes a folder that looks and behaves like a clinical archive:

- the 8 body regions of the reference study (plus a few ``whole_body`` images, which the builder drops by
  default) in the real IRMA class imbalance (``radstream.ingest.synth_plan``), several images per patient;
- region-specific anatomy (``radstream.ingest.synth_anatomy``) under a random pose, contrast, blur and
  quantum + electronic noise, bone bright;
- detector formats (2500×2048, 1760×1760, 2294×1914 mammography, ...) and random sizes, sides from ~200 px to
  ``max_side`` and aspect ratios (h/w) from 0.4 to 2.5, all scaled by ``max_side / 2500``;
- black collimation margins, sometimes a white or grey frame and a burned-in marker (L, R, AP, ...);
- 8-bit PNG, 16-bit PNG (12-bit data raw or shifted, or 16-bit) and uncompressed DICOM (MONOCHROME1 stored
  inverted / MONOCHROME2, BitsStored 12 or 16, rescale slope/intercept on some, CR/DX/MG), written by
  ``radstream.ingest.synth_formats``.

Layout::

    out_dir/images/<region>/<patient>_<k>.<png|dcm>
    out_dir/manifest.csv      path,label,irma_code,patient_id   (path relative to out_dir)
    out_dir/irma_codes.csv    image_id;irma_code                (image_id = file stem, like the real lists)
    out_dir/synth.json        parameters and summary (no timings, so a rerun leaves identical bytes)

The corpus is a pure function of (n, seed, max_side): every image has its own random stream derived from
(seed, index) and every file is written deterministically (no timestamps, DICOM UIDs from the seed), so the
bytes do not depend on ``workers``. Files are written under a hidden temporary name and renamed into place;
an image whose file already exists is skipped, so an interrupted run resumes cheaply.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import multiprocessing
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

from radstream.core.atomic import write_bytes
from radstream.core.progress import progress
from radstream.ingest.synth_detector import radiograph
from radstream.ingest.synth_formats import SYNTH_VERSION, dicom_bytes, encode_png, stored_values
from radstream.ingest.synth_plan import FORMAT_SHARES, REGION_COUNTS, ImageSpec, check_args, plan_corpus

logger = logging.getLogger(__name__)


def make_image(out_dir: str, spec: ImageSpec, seed: int) -> bool:
    """Draw and write one image unless its file exists; returns whether it was written."""
    path = Path(out_dir) / spec.relpath
    if path.exists():
        return False
    rng = np.random.default_rng([seed, 1, spec.index])
    values = stored_values(spec, radiograph(spec.region, spec.height, spec.width, rng), rng)
    write_bytes(path, dicom_bytes(spec, values, seed) if spec.fmt == "dicom" else encode_png(values))
    return True


def _make_image_task(args: tuple[str, ImageSpec, int]) -> bool:
    return make_image(*args)


def _make_images(tasks: list[tuple[str, ImageSpec, int]], workers: int) -> list[bool]:
    """Run ``make_image`` over the tasks in this process or a pool; a progress bar either way."""
    with contextlib.ExitStack() as stack:
        if workers == 1:
            results = map(_make_image_task, tasks)
        else:
            pool = stack.enter_context(multiprocessing.get_context().Pool(workers))
            chunk = max(1, min(16, len(tasks) // (8 * workers)))
            results = pool.imap(_make_image_task, tasks, chunksize=chunk)
        return list(progress(results, total=len(tasks), desc="synth", unit="img"))


def _summary(specs: list[ImageSpec], n: int, seed: int, max_side: int, out: Path) -> dict:
    classes = Counter(s.region for s in specs)
    return {
        "generator": "ingest.synth",
        "version": SYNTH_VERSION,
        "parameters": {"n": n, "seed": seed, "max_side": max_side},
        "n": n,
        "classes": {r: classes[r] for r in REGION_COUNTS},
        "formats": {f: sum(s.fmt == f for s in specs) for f in FORMAT_SHARES},
        "photometric": dict(sorted(Counter(s.photometric for s in specs if s.fmt == "dicom").items())),
        "patients": len({s.patient_id for s in specs}),
        "megapixels": round(sum(s.height * s.width for s in specs) / 1e6, 3),
        "bytes": sum((out / s.relpath).stat().st_size for s in specs),
    }


def _write_tables(out: Path, specs: list[ImageSpec]) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "label", "irma_code", "patient_id"])
    writer.writerows([s.relpath, s.region, s.irma_code, s.patient_id] for s in specs)
    write_bytes(out / "manifest.csv", buf.getvalue().encode())
    lines = ["image_id;irma_code"] + [f"{Path(s.relpath).stem};{s.irma_code}" for s in specs]
    write_bytes(out / "irma_codes.csv", ("\n".join(lines) + "\n").encode())


def _claim_folder(out: Path, parameters: dict) -> None:
    """Refuse a folder holding a corpus of other parameters; mark it as (incomplete) ours otherwise."""
    meta = out / "synth.json"
    if meta.exists():
        old = json.loads(meta.read_text())
        if old.get("parameters") != parameters or old.get("version") != SYNTH_VERSION:
            raise ValueError(
                f"{out} holds a synthetic corpus made with {old.get('parameters')} (version {old.get('version')}); "
                f"use an empty folder for {parameters}"
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    write_bytes(
        meta, json.dumps({"version": SYNTH_VERSION, "parameters": parameters, "complete": False}).encode()
    )


def synthesize(
    out_dir: str | os.PathLike, n: int, seed: int, *, max_side: int = 2500, workers: int = 1
) -> dict:
    """Write a synthetic radiograph corpus of ``n`` images into ``out_dir`` (see the module docstring).

    Args:
        out_dir: the corpus folder (created; an existing corpus of the same parameters is completed).
        n: number of images.
        seed: non-negative seed; the files are a pure function of (n, seed, max_side).
        max_side: longest image side in pixels; sizes scale by ``max_side / 2500``.
        workers: processes drawing images (does not change the output).

    Returns:
        The summary: images per class and format, patients, bytes, plus ``written``, ``skipped``,
        ``seconds`` and ``images_per_s`` of this call.

    Raises:
        ValueError: bad arguments, or ``out_dir`` holds a corpus made with other parameters.
    """
    check_args(n, seed, max_side, workers)
    start = time.perf_counter()
    out = Path(out_dir)
    parameters = {"n": n, "seed": seed, "max_side": max_side}
    _claim_folder(out, parameters)
    specs = plan_corpus(n, seed, max_side)
    for region in {s.region for s in specs}:
        (out / "images" / region).mkdir(parents=True, exist_ok=True)
    written = _make_images([(str(out), s, seed) for s in specs], workers)
    _write_tables(out, specs)
    summary = _summary(specs, n, seed, max_side, out)
    write_bytes(out / "synth.json", (json.dumps({**summary, "complete": True}, indent=2) + "\n").encode())
    seconds = time.perf_counter() - start
    result = {
        **summary,
        "written": sum(written),
        "skipped": n - sum(written),
        "workers": workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(n / seconds, 2),
    }
    logger.info("synth: %d images (%d written) in %s, %.1f s", n, result["written"], out, seconds)
    return result
