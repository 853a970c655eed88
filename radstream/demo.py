"""`radstream demo OUT`: the whole pipeline on the embedded synthetic corpus, reusing finished stages.

synthetic radiographs → shards in smart bins → MAE pretraining → embeddings → linear probes and supervised
ViT / ResNet50 baselines at 1%, 10% and 100% labels → the study's two tables, plus pictures. Training stages run
as their own processes (`python -m train.<stage>`), exactly as a user would run them; Accelerate puts them on
the GPU when there is one and on the CPU otherwise.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "demo"
FRACTIONS = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the defaults fit in about 15 minutes on 2 CPU cores."""

    images: int = 700
    max_side: int = 1024
    max_tokens: int = 64
    """Token cap of the smart bins (64 = 128x128 at patch 16): small images keep CPU training short."""
    pretrain_epochs: int = 40
    supervised_epochs: tuple[int, int] = (25, 6)
    """Epochs of the ViT and the ResNet50 baselines."""
    seeds: int = 3


TINY = DemoSize(images=80, max_side=256, max_tokens=16, pretrain_epochs=3, supervised_epochs=(2, 1), seeds=2)


def _run(stage: str, args: list[str], log_file: Path) -> None:
    """Run ``python -m <stage> args`` with its output in ``log_file``; a failure names the stage and the log."""
    cmd = [sys.executable, "-m", stage, *args]
    start = time.perf_counter()
    with open(log_file, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if code != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise RuntimeError(f"demo: {stage} failed (exit {code}); log {log_file}:\n{tail}")
    print(
        f"demo: {stage} {' '.join(a for a in args if '=' not in a or a.startswith('loader.label'))[:80]} "
        f"done in {time.perf_counter() - start:.0f} s"
    )


def stage_synth(out: Path, size: DemoSize, seed: int, workers: int) -> Path:
    from ingest.synth import synthesize

    src = out / "synth"
    synthesize(src, n=size.images, seed=seed, max_side=size.max_side, workers=workers)
    return src


def stage_shards(out: Path, src: Path, size: DemoSize, workers: int, seed: int) -> Path:
    from core.config import load_config
    from radstream.pictures import bin_pictures
    from shards.build.config import BuildConfig
    from shards.build.finalize import finalize
    from shards.build.parts import run_build
    from shards.build.verify import verify_shards

    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        cfg = load_config(
            BuildConfig,
            None,
            [
                f"source={src}",
                f"out={shards}",
                f"workers={workers}",
                f"seed={seed}",
                f"ingest.manifest_csv={src / 'manifest.csv'}",
                "ingest.labels=irma",
                "binning.strategy=smart",
                f"binning.max_tokens={size.max_tokens}",
            ],
        )
        run_build(cfg)
        finalize(cfg)
    report = verify_shards(shards)
    if not report.ok:
        raise RuntimeError(f"demo: shard verification failed: {report.problems[:3]}")
    print(report.summary())
    bin_pictures(shards, out / "pictures")
    return shards


def stage_pretrain(out: Path, shards: Path, size: DemoSize, seed: int) -> Path:
    from radstream.pictures import loss_curves

    run_dir = out / "runs" / "mae"
    if not (run_dir / "summary.json").is_file():
        _run(
            "train.pretrain",
            [
                "--config",
                str(CONFIGS / "pretrain.yaml"),
                f"shards={shards}",
                f"run_dir={run_dir}",
                f"run.epochs={size.pretrain_epochs}",
                f"run.seed={seed}",
            ],
            out / "logs" / "pretrain.log",
        )
    loss_curves(run_dir / "metrics.jsonl", out / "pictures" / "mae_loss.png")
    grids = sorted((run_dir / "samples").glob("*.png"))
    for grid in (grids[0], grids[-1]) if grids else ():
        shutil.copy(grid, out / "pictures" / f"reconstructions_{grid.stem}.png")
    return run_dir


def stage_probe(out: Path, shards: Path, mae_run: Path, size: DemoSize) -> Path:
    emb = out / "embeddings.zarr"
    probe_dir = out / "runs" / "probe"
    if not (probe_dir / "probe_results.json").is_file():
        _run(
            "train.embed",
            [
                "--checkpoint",
                str(mae_run / "best"),
                "--shards",
                str(shards),
                "--out",
                str(emb),
                "loader.backend=torch",
            ],
            out / "logs" / "embed.log",
        )
        seeds = "[" + ",".join(map(str, range(size.seeds))) + "]"
        _run(
            "train.probe",
            [
                "--config",
                str(CONFIGS / "probe.yaml"),
                "--embeddings",
                str(emb),
                "--out",
                str(probe_dir),
                f"seeds={seeds}",
            ],
            out / "logs" / "probe.log",
        )
    return probe_dir


def stage_supervised(out: Path, shards: Path, size: DemoSize, seed: int) -> Path:
    """One learning rate per (model, fraction): the demo's reduced grid (the full one is `slurm/sweep_lr`)."""
    root = out / "runs" / "supervised"
    for (name, recipe), epochs in zip(
        (("vit", "supervised_vit.yaml"), ("resnet50", "supervised_resnet50.yaml")),
        size.supervised_epochs,
        strict=False,
    ):
        for fraction in FRACTIONS:
            run_dir = root / f"{name}-f{fraction:g}"
            if (run_dir / "results.json").is_file():
                continue
            _run(
                "train.supervised",
                [
                    "--config",
                    str(CONFIGS / recipe),
                    f"shards={shards}",
                    f"run_dir={run_dir}",
                    f"loader.label_fraction={fraction}",
                    f"run.epochs={epochs}",
                    f"run.seed={seed}",
                ],
                out / "logs" / f"supervised-{name}-{fraction:g}.log",
            )
    return root


def stage_report(out: Path, runs: list[Path]) -> str:
    from train.report import write_report

    results = out / "results"
    write_report([str(r) for r in runs], str(results))
    for png in results.glob("*.png"):
        shutil.copy(png, out / "pictures" / png.name)
    for png in sorted((out / "runs" / "probe").rglob("confusion*.png"))[:1]:
        shutil.copy(png, out / "pictures" / "confusion_matrix.png")
    return (results / "results.md").read_text()


def run_demo(out: str | Path, size: DemoSize = DemoSize(), seed: int = 0, workers: int = 2) -> int:
    """Run every demo stage into ``out``; finished stages are reused on a rerun."""
    out = Path(out)
    for sub in ("pictures", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    src = stage_synth(out, size, seed, workers)
    shards = stage_shards(out, src, size, workers, seed)
    mae_run = stage_pretrain(out, shards, size, seed)
    summary = json.loads((mae_run / "summary.json").read_text())
    probe_dir = stage_probe(out, shards, mae_run, size)
    sup_dir = stage_supervised(out, shards, size, seed)
    tables = stage_report(out, [probe_dir, sup_dir])
    print(tables)
    print(f"MAE: {json.dumps({k: summary[k] for k in summary if 'loss' in k or 'mse' in k})}")
    print(
        f"demo: done in {time.perf_counter() - start:.0f} s; results in {out / 'results'}, "
        f"pictures in {out / 'pictures'}"
    )
    return 0
