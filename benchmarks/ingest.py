"""Shard-build throughput: radstream with 1 and 2 workers against a naive single-process loop.

The naive loop is what one writes by hand: read → min-max normalise → resize → encode → tarfile, one image at a
time, no header scan, no index, no checksums. All three read the same synthetic sources in the same run.

    python benchmarks/ingest.py --n 400 --max-side 2000 --repeat 3

The contenders run in turns, ``--repeat`` rounds of (naive, 1 worker, 2 workers), each on a fresh output
folder; the table gives each one's best time and the spread over the rounds, and the ratios use the best
times. Rounds, not a single run, because the first run in a process pays one-time costs (lazy imports, codec
set-up, page cache) that later ones skip, and because other work on the machine only ever adds time.
Measure on a quiet machine (``uptime``: load below 1).

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

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from PIL import Image  # noqa: E402

from radstream.core.config import load_config  # noqa: E402
from radstream.shards.builder.config import BuildConfig  # noqa: E402
from radstream.shards.builder.finalize import finalize  # noqa: E402
from radstream.shards.builder.parts import run_build  # noqa: E402


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
            img = Image.fromarray(arr).resize((size, size), Image.Resampling.BILINEAR)  # float32: mode "F"
            buf = io.BytesIO()
            Image.fromarray(np.clip(np.asarray(img) * 255 + 0.5, 0, 255).astype(np.uint8)).save(
                buf, "JPEG", quality=95
            )
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


def run_rounds(src: Path, work: Path, repeat: int) -> dict[str, tuple[int, list[float]]]:
    """Time every contender ``repeat`` times, in turns; returns {name: (images written, [seconds])}."""
    contenders = {
        "naive loop (1 process)": lambda out: naive_build(src, out.with_suffix(".tar")),
        "radstream build-shards, 1 worker": lambda out: radstream_build(src, out, 1),
        "radstream build-shards, 2 workers": lambda out: radstream_build(src, out, 2),
    }
    results: dict[str, tuple[int, list[float]]] = {name: (0, []) for name in contenders}
    for round_ in range(repeat):
        for i, (name, build) in enumerate(contenders.items()):
            out = work / f"round{round_}-{i}"
            n, secs = timed(build, out)
            results[name] = (n, results[name][1] + [secs])
            shutil.rmtree(out, ignore_errors=True)
            out.with_suffix(".tar").unlink(missing_ok=True)
    return results


def report(results: dict[str, tuple[int, list[float]]], args: argparse.Namespace) -> None:
    """Print the markdown table (best time and spread per contender) and the two target ratios."""
    print(
        f"\nshard build, {args.n} synthetic radiographs (max side {args.max_side}), jpg q95, smart bins, "
        f"best of {args.repeat}\n"
    )
    print("| contender | images | best s | spread s | images/s (best) |")
    print("|---|---:|---:|---:|---:|")
    rate = {}
    for name, (n, times) in results.items():
        rate[name] = n / min(times)
        print(f"| {name} | {n} | {min(times):.2f} | {min(times):.2f}–{max(times):.2f} | {rate[name]:.1f} |")
    naive, one, two = rate.values()
    print(f"\nratio 2 workers / 1 worker: {two / one:.2f} (target ≥ 1.8)")
    print(f"ratio 1 worker / naive loop: {one / naive:.2f} (target ≥ 1.0)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--n", type=int, default=400, help="synthetic images (fixed costs weigh less with more)"
    )
    parser.add_argument("--max-side", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="rounds of the three contenders (best is kept)")
    parser.add_argument("--keep", help="keep the synthetic sources in this folder (reused when present)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from radstream.ingest.synth import synthesize

    tmp = Path(tempfile.mkdtemp(prefix="radstream-bench-"))
    corpus = Path(args.keep) if args.keep else tmp / "synth"
    synthesize(corpus, n=args.n, seed=args.seed, max_side=args.max_side, workers=2)
    src = corpus / "images"
    # Warm the page cache so that the first contender does not pay for disk reads the others skip.
    for p in src.rglob("*"):
        if p.is_file():
            p.read_bytes()
    report(run_rounds(src, tmp, args.repeat), args)
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
