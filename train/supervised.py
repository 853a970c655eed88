"""Supervised baselines: a timm ViT or ResNet50 trained end to end on the shard dataset, under Accelerate.

    accelerate launch -m train.supervised --config configs/supervised/vit.yaml shards=OUT run_dir=RUN \\
        optim.lr=1e-4 loader.label_fraction=0.01 run.seed=1

One run is one (model, learning rate, label fraction, seed); the LR grid is swept by running several (the SLURM
sweep array), and ``radstream report`` picks the LR on validation accuracy. The ViT is the MAE encoder's
architecture with a classifier head and any image size (timm ``dynamic_img_size``), so every bin of the shard
dataset trains as it is; the ResNet is fully convolutional with global pooling. Both take 1-channel images.

Initialisation: random, or a local weights file (``model.init``; never the network, a missing file is an
error): timm/ImageNet weights (RGB stem summed to 1 channel, the learned position table resampled, the
1000-class head dropped) or, for the ViT, an MAE checkpoint's encoder.

The task of ``train.trainer``: each epoch: train (AdamW, warmup + cosine or constant LR, ``optim.grad_accum_steps``
batches a step), validation accuracy, early stopping on it
(``run.patience`` epochs), the best weights to ``run_dir/best``, a checkpoint. At the end the test split is
scored with the best weights and ``run_dir/results.json`` written (read by ``radstream report``). Restarting
the same command resumes from ``checkpoints/latest``; a finished run is not trained again. Exit codes as
``train.pretrain``: 0 done, 1 non-finite loss, 2 bad config, 124 stopped by SIGTERM/SIGUSR1: every rank
finishes its step, a checkpoint is written and ``run_dir/stopped.json`` left for job scripts (torchrun turns
the ranks' 124 into 1; ``slurm/accelerate_job.sh`` requeues on the file).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from omegaconf import MISSING
from torch import nn

from core.config import to_dict
from shards.images import unit_float
from shards.loader import ShardLoader
from shards.loader_config import LoaderConfig
from shards.manifest import read_manifest
from train import trainer
from train.classifier import ClassifierConfig, build_classifier
from train.config import CheckpointConfig, RunConfig
from train.loop import Schedule, StepStats, accumulate_step, global_mean, optimizer_steps
from train.metrics import accuracy, balanced_accuracy, per_class_recall
from train.provenance import classifier_architecture, init_name, manifest_bins
from train.run_layout import RESULTS
from train.stage import stage_main
from train.trainer import Session, TrainTask, Validation

logger = logging.getLogger(__name__)

SCHEDULES = ("cosine", "constant")
STUDY_LR_GRID = (1e-5, 1.9e-5, 3.6e-5, 6.7e-5, 1.3e-4, 2.4e-4, 4.5e-4, 8.4e-4, 1.6e-3, 3e-3)
"""Ten log-spaced AdamW rates, the study's grid size (the default of ``slurm/sweep_lr.sbatch``)."""


@dataclass(frozen=True)
class SupervisedOptimConfig:
    """AdamW with an absolute learning rate (one per run: the grid is swept by running several)."""

    lr: float = 1e-4
    """Peak learning rate."""
    lr_grid: list[float] | None = None
    """Learning rates to sweep in this one command (e.g. the study's ten, ``STUDY_LR_GRID``): each trains into
    ``run_dir/lr-<rate>`` (replacing ``lr``), one after another, each resumed when restarted, each stopped
    early on validation accuracy; ``radstream report run_dir`` then picks the rate on validation accuracy."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not on biases and norms)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    schedule: str = "cosine"
    """"cosine" (linear warmup, then cosine to min_lr over run.epochs) or "constant" (warmup, then flat)."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs."""
    min_lr: float = 0.0
    """Where the cosine ends."""
    grad_clip: float | None = None
    """Clip the global gradient norm (None: no clipping)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""
    grad_accum_steps: int = 1
    """Loader batches accumulated into one optimizer step (the LR is not scaled by it)."""

    def __post_init__(self) -> None:
        if self.lr_grid is not None and (not self.lr_grid or min(self.lr_grid) <= 0):
            raise ValueError(f"optim.lr_grid must hold rates > 0 (or be null), got {self.lr_grid}")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.lr must be > 0; min_lr, weight_decay and warmup_epochs >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.betas) != 2 or not 0 <= self.label_smoothing < 1:
            raise ValueError("optim.betas must be two values and label_smoothing in [0, 1)")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclass(frozen=True)
class SupervisedConfig:
    """``train.supervised``: one baseline run."""

    shards: str = MISSING
    """Root of a finalized, labelled shard dataset."""
    run_dir: str = MISSING
    """Output: config.yaml, metrics.jsonl, checkpoints/, best/, results.json (resumed when it exists)."""
    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """The loader; ``loader.label_fraction`` is the regime (None = all labels, 0.01 = the study's 1%)."""
    optim: SupervisedOptimConfig = field(default_factory=SupervisedOptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    """Epochs, early stopping patience (on validation accuracy here), seed, precision, devices, logging;
    ``grid_images`` is unused (reconstruction grids are the MAE task's)."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=0, keep_last=1))
    """Checkpoint cadence and retention; by default one checkpoint, at epoch ends (a sweep has many runs)."""

    def __post_init__(self) -> None:
        for name in ("shards", "run_dir"):
            if not getattr(self, name) or getattr(self, name) == MISSING:
                raise ValueError(f"{name} is required (e.g. {name}=/path)")

    @property
    def fraction(self) -> float:
        """The label fraction of the training set this run uses."""
        return 1.0 if self.loader.label_fraction is None else float(self.loader.label_fraction)


def dataset_classes(shards: str) -> list[str]:
    """The class names of a labelled shard dataset (from its manifest).

    Raises:
        ValueError: the dataset has fewer than two classes (it is not labelled).
    """
    names = list(read_manifest(shards).get("class_names") or [])
    if len(names) < 2:
        raise ValueError(f"{shards}: a classifier needs a labelled dataset (classes: {names})")
    return names


def masked_loss(
    accelerator: Accelerator, logits: torch.Tensor, batch: dict, label_smoothing: float
) -> torch.Tensor:
    """Cross-entropy over the real, labelled samples of all ranks (padding repeats and -1 labels excluded),
    normalised by their global count (``train.loop.global_mean``): this rank's share of the global mean."""
    keep = (batch["valid"].bool() & (batch["label"] >= 0)).float()
    ce = F.cross_entropy(
        logits.float(), batch["label"].clamp_min(0), reduction="none", label_smoothing=label_smoothing
    )
    return global_mean(accelerator, (ce * keep).sum(), keep.sum())


@torch.no_grad()
def evaluate_classifier(accelerator: Accelerator, model: nn.Module, loader, num_classes: int) -> np.ndarray:
    """Confusion matrix [C, C] (rows: true class) of a whole split, summed over ranks; padding skipped."""
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=accelerator.device)
    for batch in loader:
        pred = model(unit_float(batch["image"])).argmax(dim=-1)
        keep = batch["valid"].bool() & (batch["label"] >= 0)
        counts += torch.bincount(batch["label"][keep] * num_classes + pred[keep], minlength=num_classes**2)
    model.train(was_training)
    return accelerator.reduce(counts, reduction="sum").cpu().numpy().reshape(num_classes, num_classes)


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict],
    *,
    step: int,
    optim: SupervisedOptimConfig,
) -> StepStats:
    """One optimizer step of the masked cross-entropy over ``batches`` (``grad_accum_steps`` micro-batches)."""
    stats = StepStats(loss=torch.zeros(()))

    def loss_of(micro: int, batch: dict) -> torch.Tensor:
        stats.images += batch["image"].shape[0]
        stats.keys.extend(batch["key"])
        logits = model(unit_float(batch["image"]))  # stored integers → [0, 1] floats on the device
        return masked_loss(accelerator, logits, batch, optim.label_smoothing)

    stats.loss, stats.grad_norm = accumulate_step(
        accelerator, model, optimizer, batches, loss_of, step=step, grad_clip=optim.grad_clip
    )
    return stats


def train_class_counts(data, num_classes: int) -> list[int]:
    """Images per class of the training subset (its label fraction): the prior a model can learn from it."""
    labels = np.concatenate([b.label for b in data.bins.values()])
    return np.bincount(labels[labels >= 0], minlength=num_classes).tolist()


class SupervisedTask(TrainTask):
    """A supervised baseline as a trainer task: cross-entropy on the labelled samples, validation accuracy
    (early stopping), test accuracy, balanced accuracy, per-class recall and confusion in results.json."""

    results_name = RESULTS
    class_names: list[str]
    """The dataset's classes, read from its manifest by ``build_model``."""
    bins: list[str]
    """The dataset's bins (input shapes), for the results' ``architecture``."""

    def build_model(self) -> nn.Module:
        self.class_names = dataset_classes(self.cfg.shards)
        self.bins = manifest_bins(read_manifest(self.cfg.shards))
        return build_classifier(self.cfg.model, len(self.class_names))

    def describe(self) -> tuple[str, str]:
        """(the row id of the result tables, the network that ran) for results.json."""
        return self.cfg.model.kind, self.cfg.model.arch

    def architecture(self, model: nn.Module) -> dict:
        """The ``architecture`` entry of results.json: the network that ran and its input bins."""
        return classifier_architecture(self.cfg.model.kind, self.cfg.model.arch, model, self.bins)

    def schedule(self, loader_batches: int, num_processes: int) -> Schedule:
        cfg, optim = self.cfg, self.cfg.optim
        spe = optimizer_steps(loader_batches, optim.grad_accum_steps)
        return Schedule(
            global_batch=self.mean_batch_size * num_processes * optim.grad_accum_steps, peak_lr=optim.lr,
            steps_per_epoch=spe, total_steps=cfg.run.epochs * spe, warmup_steps=round(optim.warmup_epochs * spe),
            min_lr=optim.min_lr, constant=optim.schedule == "constant",
        )  # fmt: skip

    def step(self, s: Session, batches: list[dict]) -> StepStats:
        return train_step(
            s.accelerator, s.model, s.optimizer, batches, step=s.state.step, optim=self.cfg.optim
        )

    def validate(self, s: Session) -> Validation:
        val_acc = accuracy(evaluate_classifier(s.accelerator, s.model, s.val_loader, len(self.class_names)))
        return Validation("acc", val_acc, lower_is_better=False, metrics={"acc": val_acc})

    def test(self, s: Session, loader: ShardLoader, reason: str, weights: str) -> tuple[dict, dict]:
        cfg, names, (model_id, arch) = self.cfg, self.class_names, self.describe()
        cm = evaluate_classifier(s.accelerator, s.model, loader, len(names))
        results = {
            "kind": "supervised", "model": model_id, "arch": arch, "lr": cfg.optim.lr,
            "fraction": cfg.fraction, "seed": cfg.run.seed, "val_acc": -s.early.best if s.early.best_epoch >= 0 else 0.0,
            "best_epoch": s.early.best_epoch, "epochs": s.state.epoch, "steps": s.state.step, "stopped": reason,
            "tested_weights": weights, "test_acc": accuracy(cm), "test_balanced_acc": balanced_accuracy(cm),
            "per_class_recall": dict(zip(names, per_class_recall(cm), strict=True)),
            "confusion": cm.tolist(), "class_names": names, "num_processes": s.accelerator.num_processes,
            "train_class_counts": train_class_counts(s.train_loader.data, len(names)),
            "architecture": self.architecture(s.accelerator.unwrap_model(s.model)),
            "init": init_name(cfg.model.init),
            "config": to_dict(cfg),
        }  # fmt: skip
        logger.info("%s lr %g fraction %g seed %d: val %.4f, test %.4f (%s)", arch, cfg.optim.lr,
                    cfg.fraction, cfg.run.seed, results["val_acc"], results["test_acc"], reason)  # fmt: skip
        return {"acc": results["test_acc"], "balanced_acc": results["test_balanced_acc"]}, results


def run(cfg: SupervisedConfig) -> int:
    """Train (or resume) the run of ``cfg`` to its end, or every rate of ``optim.lr_grid`` into its own
    ``run_dir/lr-<rate>``; returns the exit code (0, or the first non-zero one: 124 when stopped)."""
    if cfg.optim.lr_grid is None:
        return trainer.run(SupervisedTask(cfg))
    for lr in cfg.optim.lr_grid:
        one = replace(cfg, run_dir=f"{cfg.run_dir}/lr-{lr:g}", optim=replace(cfg.optim, lr=lr, lr_grid=None))
        code = trainer.run(SupervisedTask(one))
        if code != 0:
            return code
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``accelerate launch -m train.supervised --config RECIPE key=value ...``; returns the exit code."""
    return stage_main(
        argv,
        prog="accelerate launch -m train.supervised",
        description=__doc__.split("\n")[0],
        config_cls=SupervisedConfig,
        run=run,
        example_recipe="configs/supervised/vit.yaml",
        example_override="optim.lr=1e-4",
    )


if __name__ == "__main__":
    sys.exit(main())
