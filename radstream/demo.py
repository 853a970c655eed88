"""`radstream demo OUT`: the whole pipeline on the embedded synthetic corpus, reusing finished stages."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def stage_synth(out: Path, n: int, max_side: int, seed: int, workers: int) -> Path:
    from ingest.synth import synthesize

    src = out / "synth"
    done = src / "synth.json"
    if done.is_file() and json.loads(done.read_text()).get("n") == n:
        log.info("demo: synthetic corpus already there (%s)", src)
        return src
    synthesize(src, n=n, seed=seed, max_side=max_side, workers=workers)
    return src


def stage_shards(out: Path, src: Path, workers: int, seed: int) -> Path:
    from radstream.config import load_config
    from shards.build import run_build
    from shards.config import BuildConfig
    from shards.manifest import finalize
    from shards.verify import verify_shards

    shards = out / "shards"
    cfg = load_config(
        BuildConfig,
        None,
        [f"source={src}", f"out={shards}", f"workers={workers}", f"seed={seed}",
         f"ingest.manifest_csv={src / 'manifest.csv'}", "ingest.labels=irma", "binning.strategy=smart"],
    )
    if not (shards / "manifest.json").is_file():
        run_build(cfg)
        finalize(cfg)
    report = verify_shards(shards, quick=True)
    if not report.ok:
        raise RuntimeError(f"demo: shard verification failed: {report.problems[:3]}")
    print(report.summary())
    return shards


def run_demo(out: str | Path, n: int = 600, max_side: int = 1024, seed: int = 0, workers: int = 2) -> int:
    """Run every demo stage into ``out``; finished stages are reused on a rerun."""
    from shards.binreport import bins_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    src = stage_synth(out, n, max_side, seed, workers)
    shards = stage_shards(out, src, workers, seed)
    print(bins_report(shards, batch_size=32))
    print(f"demo: done in {time.perf_counter() - start:.0f} s; everything is in {out}")
    return 0
