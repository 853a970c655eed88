"""Supervised baselines: a timm ViT or CNN trained end to end on the shard dataset, under Accelerate.

    accelerate launch -m radstream.train.supervised --config configs/supervised/vit.yaml shards=OUT run_dir=RUN \\
        optim.lr=1e-4 loader.label_fraction=0.01 run.seed=1

One run is one (model, learning rate, label fraction, seed); ``optim.lr_grid`` (``radstream.train.sweep``: a list, or
"study" for the study's ten) sweeps several rates in one command, the SLURM sweep array one rate per task, and
``radstream report`` picks the LR on validation accuracy. The ViT is the MAE encoder's architecture with a
classifier head and any image size (timm ``dynamic_img_size``), so every bin of the shard dataset trains as it
is; the CNN (``model.kind: cnn``, any timm ResNet) is fully convolutional with global pooling. Both take
1-channel images.

Initialisation: random, or a local weights file (``model.init``; never the network, a missing file is an
error): timm/ImageNet weights (RGB stem summed to 1 channel, the learned position table resampled, the
1000-class head dropped) or, for the ViT, an MAE checkpoint's encoder.

The task of ``radstream.train.trainer``: each epoch: train (``radstream.train.config.OptimConfig``: AdamW, warmup + cosine or
constant LR, ``optim.grad_accum_steps`` batches a step), validation accuracy, early stopping on it
(``run.patience`` epochs), the best weights to ``run_dir/best``, a checkpoint. At the end the test split is
scored with the best weights and ``run_dir/results.json`` written (read by ``radstream report``). Restarting
the same command resumes from ``checkpoints/latest``; a finished run is not trained again. Stop signals, the
requeue marker and exit codes: ``radstream.train.entry``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from radstream.core.config import to_dict
from radstream.shards.images import unit_float
from radstream.shards.loader import ShardLoader
from radstream.shards.manifest import read_manifest
from radstream.train import trainer
from radstream.train.classifier import ClassifierConfig, build_classifier
from radstream.train.config import BaseRunConfig, CheckpointConfig, OptimConfig
from radstream.train.entry import stage_main
from radstream.train.metrics import accuracy, balanced_accuracy, per_class_recall
from radstream.train.provenance import classifier_architecture, init_name, manifest_bins
from radstream.train.run_layout import RESULTS
from radstream.train.steps import StepStats, accumulate_step, split_sums
from radstream.train.sweep import run_sweep
from radstream.train.trainer import Session, TrainTask, Validation

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisedOptimConfig(OptimConfig):
    """AdamW at an absolute learning rate by default (``optim.lr_grid`` sweeps several), and the loss's label
    smoothing."""

    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"optim.label_smoothing must be in [0, 1), got {self.label_smoothing}")


@dataclass(frozen=True)
class SupervisedConfig(BaseRunConfig):
    """``radstream.train.supervised``: one baseline run (or one per rate of ``optim.lr_grid``)."""

    model: ClassifierConfig = field(default_factory=ClassifierConfig)
    optim: SupervisedOptimConfig = field(default_factory=SupervisedOptimConfig)
    """Early stopping (``run.patience``) watches the validation accuracy."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=0, keep_last=1))
    """Checkpoint cadence and retention; by default one checkpoint, at epoch ends (a sweep has many runs)."""


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
    logits: torch.Tensor, batch: dict, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(the summed cross-entropy of the batch's real, labelled samples, their count): padding repeats and -1
    labels excluded; ``radstream.train.steps.accumulate_step`` divides by the step's count over all micro-batches and
    ranks."""
    keep = (batch["valid"].bool() & (batch["label"] >= 0)).float()
    ce = F.cross_entropy(
        logits.float(), batch["label"].clamp_min(0), reduction="none", label_smoothing=label_smoothing
    )
    return (ce * keep).sum(), keep.sum()


def evaluate_classifier(accelerator: Accelerator, model: nn.Module, loader, num_classes: int) -> np.ndarray:
    """Confusion matrix [C, C] (rows: true class) of a whole split, summed over ranks; padding skipped."""

    def counts(batch: dict) -> torch.Tensor:
        pred = model(unit_float(batch["image"])).argmax(dim=-1)
        keep = batch["valid"].bool() & (batch["label"] >= 0)
        return torch.bincount(batch["label"][keep] * num_classes + pred[keep], minlength=num_classes**2)

    total = split_sums(accelerator, model, loader, counts, num_classes**2, dtype=torch.long)
    return total.cpu().numpy().reshape(num_classes, num_classes)


def without_padding(batch: dict) -> dict:
    """``batch`` without its padding repeats (``valid`` false), keeping at least two rows (BatchNorm needs
    more than one value per channel, and every rank must run the model for the gradients' all-reduce): the
    repeats carry no loss, so computing them is waste, and at a small label fraction a bin's batch is mostly
    repeats (1%: 2-3 real images of 16). Tensors and lists of the batch's length are cut alike."""
    valid = batch["valid"].bool().cpu()  # one transfer from the device: the cut is decided on the host
    n = valid.shape[0]
    keep = valid.clone()
    keep[torch.nonzero(~valid).flatten()[: max(0, 2 - int(valid.sum()))]] = True
    if bool(keep.all()):
        return batch
    rows = torch.nonzero(keep).flatten()
    cut, on = {}, {}
    for name, value in batch.items():
        if isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n:
            if value.device not in on:
                on[value.device] = rows.to(value.device, non_blocking=True)
            cut[name] = value.index_select(0, on[value.device])
        elif isinstance(value, list) and len(value) == n:
            cut[name] = [value[i] for i in rows.tolist()]
        else:
            cut[name] = value
    return cut


def train_step(
    accelerator: Accelerator,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict],
    *,
    step: int,
    optim: SupervisedOptimConfig,
    drop_padding: bool = False,
) -> StepStats:
    """One optimizer step of the masked cross-entropy over ``batches`` (``grad_accum_steps`` micro-batches).
    ``drop_padding`` (the trainer sets it unless compiling): the model computes only the real samples
    (``without_padding``); off under torch.compile,
    whose graphs keep each bin's static batch shape (the repeats are then masked out of the loss: the same
    gradient for a ViT, while a CNN's BatchNorm statistics include them)."""
    stats = StepStats(loss=torch.zeros(()))

    def loss_of(micro: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        stats.images += batch["image"].shape[0]
        stats.keys.extend(batch["key"])
        batch = without_padding(batch) if drop_padding else batch
        logits = model(unit_float(batch["image"]))  # stored integers → [0, 1] floats on the device
        return masked_loss(logits, batch, optim.label_smoothing)

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

    def step(self, s: Session, batches: list[dict]) -> StepStats:
        cfg = self.cfg
        return train_step(s.accelerator, s.model, s.optimizer, batches, step=s.state.step, optim=cfg.optim,
                          drop_padding=not cfg.run.compile)  # fmt: skip

    def validate(self, s: Session) -> Validation:
        val_acc = accuracy(evaluate_classifier(s.accelerator, s.model, s.val_loader, len(self.class_names)))
        return Validation("acc", val_acc, lower_is_better=False, metrics={"acc": val_acc})

    def test(self, s: Session, loader: ShardLoader, reason: str, weights: str) -> tuple[dict, dict]:
        cfg, names, (model_id, arch) = self.cfg, self.class_names, self.describe()
        cm = evaluate_classifier(s.accelerator, s.model, loader, len(names))
        results = {
            "kind": "supervised", "model": model_id, "arch": arch, "lr": cfg.optim.lr, "lr_rule": cfg.optim.lr_rule,
            "peak_lr": s.schedule.peak_lr,
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


STAGE_CONFIG = SupervisedConfig
"""The config this stage loads (``radstream.workflow`` loads it the same way to count a run's steps)."""


def run(cfg: SupervisedConfig) -> int:
    """Train (or resume) the run of ``cfg`` to its end, or every rate of ``optim.lr_grid`` into its own
    ``run_dir/lr-<rate>`` (``radstream.train.sweep``); returns the exit code (0, or the first non-zero one)."""
    return run_sweep(cfg, lambda one: trainer.run(SupervisedTask(one)))


def main(argv: Sequence[str] | None = None) -> int:
    """``accelerate launch -m radstream.train.supervised --config RECIPE key=value ...``; returns the exit code."""
    return stage_main(
        argv,
        prog="accelerate launch -m radstream.train.supervised",
        description=__doc__.split("\n")[0],
        config_cls=STAGE_CONFIG,
        run=run,
        example_recipe="configs/supervised/vit.yaml",
        example_override="optim.lr=1e-4",
    )


if __name__ == "__main__":
    sys.exit(main())
