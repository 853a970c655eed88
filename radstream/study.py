"""`radstream study SOURCE OUT`: the reference study on the user's own radiographs, on one machine.

The stages of the demo (``radstream.workflow``) on SOURCE with the study's full protocol: shards in smart bins,
MAE pretraining (ViT-B/16), embeddings and linear probes (10 LRs x 3 aggregations), the supervised ViT and
ResNet50 and MAE fine-tuning each over the 10-value LR grid, every label fraction (1%, 10%, 100%) and 3 seeds,
early stopping with patience 10; then the tables and pictures. Every GPU of the machine is used (accelerate
launch), or the CPU. Finished stages and runs are reused, so the same command resumes an interrupted study.
Larger archives: the SLURM route (slurm/README.md).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from pathlib import Path

from radstream.demo import DemoSize
from radstream.train.sweep import STUDY_LR_GRID
from radstream.workflow import StudyProtocol, run_stages

FULL = StudyProtocol(
    {
        "pretrain": "configs/pretrain/vit_b16_224.yaml",
        "probe": "configs/probe/default.yaml",
        "vit": "configs/supervised/vit.yaml",
        "cnn": "configs/supervised/resnet50.yaml",
        "finetune": "configs/finetune/vit.yaml",
    },
    lrs=STUDY_LR_GRID,
    seeds=3,
    train_seeds=3,
    patience=10,
    min_steps=1000,
)
"""The study's protocol with the study's models. Its minimum: 1000 optimizer steps for every trained model
at every fraction, about what a full-data run makes before patience can end it (8000 images at batch 64 are
125 steps an epoch; 10 validations without gain are 1250 steps), so a 1% run (80 images, an epoch of a few
steps) makes as many updates as the run it is compared with, not 100 epochs' worth."""
TINY = StudyProtocol(
    {
        "pretrain": "configs/pretrain/debug.yaml",
        "probe": "configs/probe/debug.yaml",
        "vit": "configs/supervised/debug_vit.yaml",
        "cnn": "configs/supervised/debug_resnet.yaml",
        "finetune": "configs/finetune/debug.yaml",
    },
    lrs=(1e-3,),
    seeds=1,
    train_seeds=1,
    epochs={"pretrain": 2, "vit": 1, "cnn": 1, "finetune": 1},
    max_tokens=16,
    min_steps=2,
)
"""A minute or two on a CPU: the debug recipes' tiny models on the CPU, one LR and seed, an epoch or two (to
try the command; what its test runs)."""
SMALL = dataclasses.replace(DemoSize().protocol(), max_tokens=DemoSize().max_tokens, threads=None)
"""The demo's protocol on the user's own radiographs, for a machine without a GPU: the demo's small models
(a ViT 96 wide and 4 blocks, a resnet10t), images binned to at most 64 patches (128x128), each recipe's one
learning rate, 2 seeds, the demo's epochs and minimum steps, every core of the machine (the demo fixes 2
threads): an hour or two on a few thousand images on a laptop, and the way to try radstream on one's own data
before the full protocol."""
PROTOCOLS = {"full": FULL, "small": SMALL, "tiny": TINY}


def make_protocol(
    name: str,
    lrs: Sequence[float] | None = None,
    seeds: int | None = None,
    fractions: Sequence[float] | None = None,
) -> StudyProtocol:
    """The named protocol with the given learning rates, seeds (probes and trained models) and fractions."""
    protocol = PROTOCOLS[name]
    changes: dict = {}
    if lrs:
        changes["lrs"] = tuple(lrs)
    if seeds is not None:
        changes.update(seeds=seeds, train_seeds=seeds)
    if fractions:
        changes["fractions"] = tuple(fractions)
    return dataclasses.replace(protocol, **changes)


def run_study(
    source: str | Path, out: str | Path, protocol: StudyProtocol, *, build_overrides: Sequence[str] = (), seed: int = 0,
    workers: int = 4,
) -> int:  # fmt: skip
    """Every stage of the study on ``source`` into ``out``; finished stages and runs are reused."""
    start = time.perf_counter()
    build = [
        *([f"binning.max_tokens={protocol.max_tokens}"] if protocol.max_tokens else []),
        *build_overrides,
    ]
    tables = run_stages(Path(out), Path(source), protocol, build_overrides=build, seed=seed, workers=workers,
                        prefix="study")  # fmt: skip
    print(tables)
    print(f"study: done in {time.perf_counter() - start:.0f} s; results in {Path(out) / 'results'}")
    return 0
