"""The study's stages, shared by `radstream demo` (synthetic data, a tiny protocol) and `radstream study`
(the user's files, the full protocol): shards → MAE pretraining → embeddings → linear probes → supervised
ViT / ResNet50 and MAE fine-tuning over the LR grid, label fractions and seeds → tables, pictures, and the
encoder exported with its model card (``OUT/encoder``, as ``radstream export``).

A stage whose outputs exist is reused (a finished training run is skipped by the file it leaves, so an
interrupted study resumes at the next run). Training stages run as their own processes, exactly as a user
would run them: ``python -m train.<stage>`` on one GPU or the CPU, ``accelerate launch --multi_gpu
--num_processes <GPUs>`` when the machine has several.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from radstream.core.progress import progress
from radstream.train.run_layout import lr_dir
from radstream.train.sweep import STUDY_LR_GRID

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
"""What fixes the CPU threads of torch (intra-op) and of MKL in a stage process."""
FRACTIONS = (0.01, 0.1, 1.0)


@dataclass(frozen=True)
class StudyProtocol:
    """Which recipes, and how much of the study's protocol: learning rates, seeds, epochs, fractions."""

    recipes: dict[str, str]
    """Recipe per stage: pretrain, probe, vit, cnn, finetune (paths relative to the checkout)."""
    lrs: tuple[float, ...] | None = STUDY_LR_GRID
    """The LR grid of the supervised and fine-tuning runs; None: each recipe's one rate."""
    seeds: int = 3
    """Seeds of every probe regime."""
    train_seeds: int = 3
    """Seeds of every supervised and fine-tuning (fraction, LR)."""
    patience: int = 10
    """Early stopping of every trained model, probes included: validations (one per epoch) without a better
    validation score; it never ends a run before ``min_steps``."""
    fractions: tuple[float, ...] = FRACTIONS
    epochs: dict[str, int] | None = None
    """Epochs per stage (pretrain, vit, cnn, finetune, probe: its max_epochs), the cap under which
    early stopping ends a run; None or a missing stage: the recipe's."""
    max_tokens: int | None = None
    """Token cap of the smart bins (None: the build's default)."""
    threads: int | None = None
    """CPU threads of every stage process (OMP_NUM_THREADS, MKL_NUM_THREADS; None: torch's default, the
    machine's cores). A fixed count makes a CPU run's float reductions, and so its tables, the same on
    machines with another number of cores (the same CPU instruction set assumed); the demo fixes 2."""
    deterministic: bool = False
    """``run.deterministic`` for every trained model: torch's deterministic algorithms (GPU reruns too)."""
    min_steps: int = 0
    """The one minimum of every trained model (supervised, fine-tuned, every probe head; not the MAE, which
    sees every image): at least this many optimizer steps at every label fraction, the epoch cap raised to
    hold them, early stopping never before them (``run.min_steps``, the probe's ``min_steps``). A small
    fraction thus trains more epochs: at 1% an epoch can be one step, and a few steps leave a network from
    scratch, and its BatchNorm statistics, untrained. Trained models validate every fifth of it
    (``val_every_steps``)."""

    def recipe(self, stage: str) -> Path:
        return ROOT / self.recipes[stage]

    def overrides(self, stage: str) -> list[str]:
        """Overrides every run of ``stage`` gets from the protocol."""
        epochs = (self.epochs or {}).get(stage)
        out = [f"run.patience={self.patience}"] + ([f"run.epochs={epochs}"] if epochs else [])
        out += [f"run.deterministic={str(self.deterministic).lower()}"]
        if stage == "pretrain":  # the MAE sees every image each epoch: no minimum, validation every epoch
            return out
        return out + [f"run.min_steps={self.min_steps}", f"run.val_every_steps={self.val_every_steps}"]

    @property
    def val_every_steps(self) -> int:
        """Steps between validations of a trained model (``run.val_every_steps``): a fifth of ``min_steps``, so
        that a small fraction's one-step epochs validate about five times within the minimum instead of at
        every step (a validation scores the whole validation split: at 1% it costs more than the steps
        between), and patience (10 validations) spans about twice the minimum."""
        return self.min_steps // 5

    def env(self) -> dict[str, str]:
        """The environment of every stage process: this one's, with the protocol's thread count."""
        fixed = {} if self.threads is None else dict.fromkeys(THREAD_VARIABLES, str(self.threads))
        return {**os.environ, **fixed}


def world_size() -> int:
    """Processes of a training stage: the machine's GPUs, else one."""
    import torch

    return max(1, torch.cuda.device_count())


def launcher() -> list[str]:
    """How a training stage starts: all the machine's GPUs under accelerate launch, else one process."""
    gpus = world_size()
    if gpus > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            f"--num_processes={gpus}",
            "-m",
        ]
    return [sys.executable, "-m"]


def run_stage(
    stage: str, args: Sequence[str], log_file: Path, prefix: str, env: dict[str, str] | None = None
) -> None:
    """``stage`` as its own process (environment ``env``, default this one's) with its output in ``log_file``;
    a failure names the stage and the log."""
    cmd = [*(launcher() if stage != "radstream.eval.probe" else [sys.executable, "-m"]),
           stage, *args]  # fmt: skip
    log_file.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log_file, "w") as fh:
        code = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    if code != 0:
        tail = "\n".join(log_file.read_text().splitlines()[-15:])
        raise RuntimeError(f"{prefix}: {stage} failed (exit {code}); log {log_file}:\n{tail}")
    shown = " ".join(
        a for a in args if "=" not in a or a.startswith(("loader.label", "optim.lr", "run.seed"))
    )
    print(f"{prefix}: {stage} {shown[-100:]} done in {time.perf_counter() - start:.0f} s", flush=True)


def header(prefix: str, number: int, total: int, what: str) -> None:
    """The line that says which stage is starting."""
    print(f"{prefix}: [{number}/{total}] {what}", flush=True)


def stage_shards(out: Path, source: Path, build_overrides: Sequence[str], workers: int, seed: int) -> Path:
    """Build, finalize and verify the shard dataset (reused when its manifest exists); bin pictures."""
    from radstream.core.config import load_config
    from radstream.pictures import bin_pictures
    from radstream.shards.builder.config import BuildConfig
    from radstream.shards.builder.parts import build_dataset
    from radstream.shards.builder.verify import verify_shards

    shards = out / "shards"
    if not (shards / "manifest.json").is_file():
        overrides = [f"source={source}", f"out={shards}", f"workers={workers}", f"seed={seed}",
                     "binning.strategy=smart", *build_overrides]  # fmt: skip
        cfg = load_config(BuildConfig, None, overrides)
        build_dataset(cfg)
    report = verify_shards(shards)
    if not report.ok:
        raise RuntimeError(f"shard verification failed: {report.problems[:3]}")
    print(report.summary())
    bin_pictures(shards, out / "pictures")
    return shards


def stage_pretrain(out: Path, shards: Path, protocol: StudyProtocol, seed: int, prefix: str) -> Path:
    """MAE pretraining (reused when summary.json exists); loss curves and reconstruction grids."""
    from radstream.pictures import loss_curves

    run_dir = out / "runs" / "mae"
    if not (run_dir / "summary.json").is_file():
        args = ["--config", str(protocol.recipe("pretrain")), f"shards={shards}", f"run_dir={run_dir}",
                f"run.seed={seed}", *protocol.overrides("pretrain")]  # fmt: skip
        run_stage("radstream.train.pretrain", args, out / "logs" / "pretrain.log", prefix, env=protocol.env())
    loss_curves(run_dir / "metrics.jsonl", out / "pictures" / "mae_loss.png")
    grids = sorted((run_dir / "samples").glob("*.png"))
    for grid in (grids[0], grids[-1]) if grids else ():
        shutil.copy(grid, out / "pictures" / f"reconstructions_{grid.stem}.png")
    return run_dir


def stage_probe(out: Path, shards: Path, mae_run: Path, protocol: StudyProtocol, prefix: str) -> Path:
    """Embeddings of the MAE run's weights (its best/: ``radstream.train.run_layout.resolve_weights``), then the probe
    grid (reused when probe_results.json exists)."""
    emb, probe_dir = out / "embeddings.zarr", out / "runs" / "probe"
    if not (probe_dir / "probe_results.json").is_file():
        args = ["--checkpoint", str(mae_run), "--shards", str(shards), "--out", str(emb),
                "loader.backend=torch"]  # fmt: skip
        run_stage("radstream.eval.embed", args, out / "logs" / "embed.log", prefix, env=protocol.env())
        seeds = "[" + ",".join(map(str, range(protocol.seeds))) + "]"
        fractions = "[" + ",".join(f"{f:g}" for f in protocol.fractions) + "]"
        epochs = (protocol.epochs or {}).get("probe")
        args = ["--config", str(protocol.recipe("probe")), "--embeddings", str(emb), "--out", str(probe_dir),
                f"seeds={seeds}", f"label_fractions={fractions}", f"patience={protocol.patience}",
                f"min_steps={protocol.min_steps}", *([f"max_epochs={epochs}"] if epochs else [])]  # fmt: skip
        run_stage("radstream.eval.probe", args, out / "logs" / "probe.log", prefix, env=protocol.env())
    return probe_dir


@dataclass(frozen=True)
class TrainedModel:
    """One row of the tables trained over the grid: which stage module, recipe key, extra overrides."""

    name: str
    module: str
    overrides: tuple[str, ...] = ()


def stage_grid(out: Path, shards: Path, model: TrainedModel, protocol: StudyProtocol, prefix: str) -> Path:
    """Every (fraction, LR, seed) run of ``model``; finished runs (results.json) are skipped."""
    root = out / "runs" / model.name
    lrs = protocol.lrs or (None,)
    runs = [(f, lr, s) for f in protocol.fractions for lr in lrs for s in range(protocol.train_seeds)]
    with progress(total=len(runs), desc=model.name, unit="run") as bar:
        for fraction, lr, seed in runs:
            run_dir = root / f"f{fraction:g}" / (lr_dir(lr) if lr else "lr-recipe") / f"seed-{seed}"
            if not (run_dir / "results.json").is_file():
                args = ["--config", str(protocol.recipe(model.name)), f"shards={shards}", f"run_dir={run_dir}",
                        f"loader.label_fraction={fraction}", f"run.seed={seed}",
                        *protocol.overrides(model.name),
                        *model.overrides, *([f"optim.lr={lr}"] if lr else [])]  # fmt: skip
                log_file = out / "logs" / model.name / f"f{fraction:g}-lr{lr or 'recipe'}-seed{seed}.log"
                run_stage(model.module, args, log_file, prefix, env=protocol.env())
            bar.update()
    return root


def stage_report(out: Path, runs: list[Path], mae_run: Path) -> str:
    """The tables (results/: the accuracy tables of ``runs`` and the MAE pretraining table of ``mae_run``),
    the pictures, and the encoder exported with its model card (encoder/: the probe and fine-tuning results
    of its weights included)."""
    from radstream.report.export import export
    from radstream.report.report import write_report

    results = out / "results"
    write_report([str(r) for r in [*runs, mae_run]], str(results))  # the MAE's own table too
    for png in results.glob("*.png"):
        shutil.copy(png, out / "pictures" / png.name)
    for png in sorted((out / "runs" / "probe").rglob("confusion*.png"))[:1]:
        shutil.copy(png, out / "pictures" / "confusion_matrix.png")
    export(mae_run, out / "encoder", results=[out / "runs"], force=True)
    return (results / "results.md").read_text()


def run_stages(
    out: Path, source: Path, protocol: StudyProtocol, *, build_overrides: Sequence[str], seed: int, workers: int,
    prefix: str, first: int = 1,
) -> str:  # fmt: skip
    """Shards, pretraining, probes, the three trained rows and the report into ``out`` (stage headers
    numbered from ``first``); returns the tables."""
    total = first + 4
    for sub in ("pictures", "logs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    header(prefix, first, total, "shards")
    shards = stage_shards(out, source, build_overrides, workers, seed)
    header(prefix, first + 1, total, "MAE pretraining")
    mae_run = stage_pretrain(out, shards, protocol, seed, prefix)
    header(prefix, first + 2, total, "embeddings and linear probes")
    probe_dir = stage_probe(out, shards, mae_run, protocol, prefix)
    trained = (
        TrainedModel("vit", "radstream.train.supervised"),
        TrainedModel("cnn", "radstream.train.supervised"),
        TrainedModel("finetune", "radstream.train.finetune", (f"model.init={mae_run}",)),
    )
    header(prefix, first + 3, total, "supervised baselines (ViT, CNN), MAE fine-tuning")
    roots = [stage_grid(out, shards, model, protocol, prefix) for model in trained]
    header(prefix, first + 4, total, "report")
    return stage_report(out, [probe_dir, *roots], mae_run)
