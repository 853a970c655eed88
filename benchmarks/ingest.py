"""Shard-build throughput: radstream with 1 and 2 workers against a naive single-process loop.

The naive loop is what one writes by hand: read → min-max normalise → resize → encode → tarfile, one image at a
time, no header scan, no index, no checksums. All three read the same synthetic sources in the same run.

    python benchmarks/ingest.py --n 300 --max-side 2000

Targets (issue 2): 2 workers ≥ 1.8 × 1 worker; 1 worker ≥ 1.0 × the naive loop.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

# This file is named like the `ingest` package: keep its own folder off the import path.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np
import pydicom
from PIL import Image

from radstream.config import load_config
from shards.build import run_build
from shards.config import BuildConfig
from shards.manifest import finalize


def naive_build(src: Path, out_tar: Path, size: int = 224) -> int:
    """The hand-written baseline; returns images written."""
    n = 0
    with tarfile.open(out_tar, "w") as tar:
        for path in sorted(src.rglob("*")):
            if not path.is_file():
                continue
            if path.suffix == ".dcm":
                arr = pydicom.dcmread(path).pixel_array.astype(np.float32)
            else:
                arr = np.asarray(Image.open(path), dtype=np.float32)
            lo, hi = float(arr.min()), float(arr.max())
            arr = (arr - lo) / max(hi - lo, 1e-12)
            img = Image.fromarray(arr, mode="F").resize((size, size), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            Image.fromarray(np.clip(np.asarray(img) * 255 + 0.5, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=95)
            data = buf.getvalue()
            info = tarfile.TarInfo(f"{path.stem}.jpg")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
            n += 1
    return n


def radstream_build(src: Path, out: Path, workers: int) -> int:
    cfg = load_config(
        BuildConfig, None, [f"source={src}", f"out={out}", f"workers={workers}", "ingest.labels=folder"]
    )
    run_build(cfg)
    return finalize(cfg)["counts"]["written"]


def timed(fn, *args) -> tuple[int, float]:
    start = time.perf_counter()
    n = fn(*args)
    return n, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=300)
    parser.add_argument("--max-side", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="keep the synthetic sources in this folder (reused when present)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from ingest.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="radstream-bench-"))
    corpus = Path(args.keep) if args.keep else tmp / "synth"
    synthesize(corpus, n=args.n, seed=args.seed, max_side=args.max_side, workers=2)
    src = corpus / "images"
    # Warm the page cache so that the first contender does not pay for disk reads the others skip.
    for p in src.rglob("*"):
        if p.is_file():
            p.read_bytes()
    rows = []
    n, secs = timed(naive_build, src, tmp / "naive.tar")
    rows.append(("naive loop (1 process)", n, secs))
    for workers in (1, 2):
        n, secs = timed(radstream_build, src, tmp / f"w{workers}", workers)
        rows.append((f"radstream build-shards, {workers} worker{'s' * (workers > 1)}", n, secs))
    rate = {name: n / secs for name, n, secs in rows}
    print(f"\nshard build, {args.n} synthetic radiographs (max side {args.max_side}), jpg q95, smart bins\n")
    print("| contender | images | seconds | images/s |")
    print("|---|---:|---:|---:|")
    for name, n, secs in rows:
        print(f"| {name} | {n} | {secs:.1f} | {n / secs:.1f} |")
    naive, one, two = (rate[r[0]] for r in rows)
    print(f"\nratio 2 workers / 1 worker: {two / one:.2f} (target ≥ 1.8)")
    print(f"ratio 1 worker / naive loop: {one / naive:.2f} (target ≥ 1.0)")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
