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

Each epoch: train (AdamW, warmup + cosine or constant LR), validation accuracy, early stopping on it
(``run.patience`` epochs), the best weights to ``run_dir/best``, a checkpoint. At the end the test split is
scored with the best weights and ``run_dir/results.json`` written (read by ``radstream report``). Restarting
the same command resumes from ``checkpoints/latest``; a finished run is not trained again. Exit codes as
``train.pretrain``: 0 done, 1 non-finite loss, 2 bad config, 124 stopped by SIGTERM/SIGUSR1: every rank
finishes its step, a checkpoint is written and ``run_dir/stopped.json`` left for job scripts (torchrun turns
the ranks' 124 into 1; ``slurm/accelerate_job.sh`` requeues on the file).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from omegaconf import MISSING
from torch import nn
from tqdm import tqdm

from core.atomic import write_text
from core.config import to_dict, to_yaml
from shards.loader import ShardLoader, build_loader
from shards.loader_config import LoaderConfig
from shards.manifest import read_manifest
from train.checkpoint import latest_checkpoint, load_checkpoint, load_weights, save_checkpoint, save_weights
from train.classifier import build_classifier
from train.config import RunConfig
from train.loop import (
    EXIT_OK,
    EXIT_REQUEUE,
    EarlyStopping,
    LoopState,
    StepStats,
    StopSignal,
    agree_after_step,
    build_accelerator,
    clear_stopped,
    lr_at,
    mark_stopped,
    set_lr,
    stage_main,
    training_over,
)
from train.report import accuracy, balanced_accuracy, per_class_recall

logger = logging.getLogger(__name__)

KINDS = ("vit", "resnet50")
SCHEDULES = ("cosine", "constant")
BEST_DIR = "best"
"""run_dir/best/model.safetensors: the weights of the best validation epoch."""
RESULTS = "results.json"


@dataclass(frozen=True)
class ClassifierConfig:
    """The network."""

    kind: str = "vit"
    """Which baseline this is, the row of the result tables: "vit" or "resnet50"."""
    arch: str = "vit_base_patch16_224"
    """timm model name (created with pretrained=False, in_chans=1), e.g. resnet50, or resnet10t for tests."""
    embed_dim: int | None = None
    """ViT only: override the width (with depth and num_heads: a tiny debug ViT)."""
    depth: int | None = None
    """ViT only: override the number of blocks."""
    num_heads: int | None = None
    """ViT only: override the attention heads."""
    drop_path_rate: float = 0.0
    """Stochastic depth."""
    init: str | None = None
    """Local weights file to start from (timm/ImageNet state dict, or an MAE checkpoint for the ViT); None:
    random initialisation."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
        if not timm.is_model(self.arch):
            raise ValueError(f"model.arch {self.arch!r} is not a timm model name")
        overrides = (self.embed_dim, self.depth, self.num_heads)
        if self.kind != "vit" and any(v is not None for v in overrides):
            raise ValueError("model.embed_dim, depth and num_heads apply to the ViT only")


@dataclass(frozen=True)
class SupervisedOptimConfig:
    """AdamW with an absolute learning rate (one per run: the grid is swept by running several)."""

    lr: float = 1e-4
    """Peak learning rate."""
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

    def __post_init__(self) -> None:
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("optim.lr must be > 0; min_lr, weight_decay and warmup_epochs >= 0")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if len(self.betas) != 2 or not 0 <= self.label_smoothing < 1:
            raise ValueError("optim.betas must be two values and label_smoothing in [0, 1)")


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
    ``grid_images`` is unused."""

    def __post_init__(self) -> None:
        for name in ("shards", "run_dir"):
            if not getattr(self, name) or getattr(self, name) == MISSING:
                raise ValueError(f"{name} is required (e.g. {name}=/path)")

    @property
    def fraction(self) -> float:
        """The label fraction of the training set this run uses."""
        return 1.0 if self.loader.label_fraction is None else float(self.loader.label_fraction)


# ------------------------------------------------------------------------------------------------ the loop


@dataclass
class Session:
    """What one run holds, passed between the loop's functions."""

    cfg: SupervisedConfig
    accelerator: Accelerator
    model: nn.Module
    optimizer: torch.optim.Optimizer
    train_loader: ShardLoader
    val_loader: ShardLoader
    class_names: list[str]
    early: EarlyStopping
    stop: StopSignal
    state: LoopState = field(default_factory=LoopState)

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.run_dir)

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def masked_loss(logits: torch.Tensor, batch: dict, label_smoothing: float) -> torch.Tensor:
    """Mean cross-entropy over the batch's real, labelled samples (padding repeats and -1 labels excluded)."""
    keep = (batch["valid"].bool() & (batch["label"] >= 0)).float()
    ce = F.cross_entropy(
        logits.float(), batch["label"].clamp_min(0), reduction="none", label_smoothing=label_smoothing
    )
    return (ce * keep).sum() / keep.sum().clamp_min(1.0)


@torch.no_grad()
def evaluate_classifier(accelerator: Accelerator, model: nn.Module, loader, num_classes: int) -> np.ndarray:
    """Confusion matrix [C, C] (rows: true class) of a whole split, summed over ranks; padding skipped."""
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    counts = torch.zeros(num_classes * num_classes, dtype=torch.long, device=accelerator.device)
    for batch in loader:
        pred = model(batch["image"]).argmax(dim=-1)
        keep = batch["valid"].bool() & (batch["label"] >= 0)
        counts += torch.bincount(batch["label"][keep] * num_classes + pred[keep], minlength=num_classes**2)
    model.train(was_training)
    return accelerator.reduce(counts, reduction="sum").cpu().numpy().reshape(num_classes, num_classes)


def _optimizer(model: nn.Module, cfg: SupervisedOptimConfig) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and tokens."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        skip = param.ndim <= 1 or any(t in name for t in ("pos_embed", "cls_token"))
        (no_decay if skip else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.betas[0], cfg.betas[1]))


def _setup(cfg: SupervisedConfig, accelerator: Accelerator, stop: StopSignal) -> Session:
    """Model, optimizer and loaders; resumed from the latest checkpoint when there is one."""
    set_seed(cfg.run.seed)
    class_names = list(read_manifest(cfg.shards).get("class_names") or [])
    if len(class_names) < 2:
        raise ValueError(
            f"{cfg.shards}: a supervised baseline needs a labelled dataset (classes: {class_names})"
        )
    model = build_classifier(cfg.model, len(class_names))
    optimizer = _optimizer(model, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    loaders = [_loader(cfg, accelerator, split) for split in ("train", "val")]
    s = Session(cfg, accelerator, model, optimizer, *loaders, class_names, EarlyStopping(cfg.run.patience,
                cfg.run.min_delta), stop)  # fmt: skip
    path = latest_checkpoint(s.run_dir)
    if path is not None:
        saved = load_checkpoint(accelerator, path)
        s.state = LoopState(**saved["loop"])
        s.early.load_state_dict(saved["early_stopping"])
        if s.state.epoch_step:
            s.train_loader.load_state_dict(saved["loader"])
        logger.info("resumed from %s: epoch %d, step %d", path, s.state.epoch, s.state.step)
    if accelerator.is_main_process:
        s.run_dir.mkdir(parents=True, exist_ok=True)
        (s.run_dir / "config.yaml").write_text(to_yaml(cfg))
    clear_stopped(accelerator, s.run_dir)
    return s


def _loader(cfg: SupervisedConfig, accelerator: Accelerator, split: str) -> ShardLoader:
    return build_loader(
        cfg.loader, cfg.shards, split, process_index=accelerator.process_index,
        num_processes=accelerator.num_processes, device=accelerator.device, train=split == "train",
    )  # fmt: skip


def _lr(s: Session) -> float:
    optim, spe = s.cfg.optim, s.steps_per_epoch
    warmup, total = round(optim.warmup_epochs * spe), s.cfg.run.epochs * spe
    if optim.schedule == "constant" and s.state.step >= warmup:
        return optim.lr
    return lr_at(s.state.step, peak_lr=optim.lr, min_lr=optim.min_lr, warmup_steps=warmup, total_steps=total)


def _log(s: Session, split: str, metrics: dict) -> None:
    """One line of metrics.jsonl (main process)."""
    if s.accelerator.is_main_process:
        line = {"split": split, "epoch": s.state.epoch, "step": s.state.step, **metrics}
        with open(s.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(line) + "\n")


def _checkpoint(s: Session) -> None:
    state = {
        "loop": asdict(s.state),
        "loader": s.train_loader.state_dict(),
        "early_stopping": s.early.state_dict(),
    }
    save_checkpoint(s.accelerator, s.run_dir, s.state.step, state, to_yaml(s.cfg), keep_last=1)


def _train_epoch(s: Session) -> str | None:
    """The rest of the current epoch; returns "signal" or "max_steps" when stopping inside it."""
    cfg, acc, st = s.cfg, s.accelerator, s.state
    s.train_loader.set_epoch(st.epoch)  # a no-op for a loader restored mid-epoch
    s.model.train()
    bar = tqdm(
        total=s.steps_per_epoch,
        initial=st.epoch_step,
        desc=f"epoch {st.epoch}",
        disable=not acc.is_main_process,
    )
    batches = iter(s.train_loader)
    try:
        for batch in batches:
            set_lr(s.optimizer, lr := _lr(s))
            loss = masked_loss(s.model(batch["image"]), batch, cfg.optim.label_smoothing)
            acc.backward(loss)
            if cfg.optim.grad_clip is not None:
                acc.clip_grad_norm_(s.model.parameters(), cfg.optim.grad_clip)
            s.optimizer.step()
            s.optimizer.zero_grad(set_to_none=True)
            stats = StepStats(loss=loss.detach(), keys=list(batch["key"]))
            stop = agree_after_step(acc, s.stop.requested, stats=stats, step=st.step)
            st.step, st.epoch_step = st.step + 1, st.epoch_step + 1
            bar.update()
            if st.step % cfg.run.log_every == 0:
                _log(s, "train", {"loss": float(loss.detach()), "lr": lr})
            if stop or (cfg.run.max_steps is not None and st.step >= cfg.run.max_steps):
                _checkpoint(s)  # every rank finished this step: the checkpoint resumes right after it
                return "signal" if stop else "max_steps"
    finally:
        batches.close()  # a stop mid-epoch: release the loader's pipeline now, not at garbage collection
        bar.close()
    return None


def _end_epoch(s: Session) -> None:
    """Validation accuracy, early stopping, best weights, the epoch's checkpoint."""
    cm = evaluate_classifier(s.accelerator, s.model, s.val_loader, len(s.class_names))
    val_acc = accuracy(cm)
    if s.early.update(-val_acc, s.state.epoch):  # EarlyStopping minimises: the negative accuracy
        save_weights(
            s.accelerator, s.model, s.run_dir / BEST_DIR, {"epoch": s.state.epoch, "val_acc": val_acc}
        )
    _log(s, "val", {"acc": val_acc, "best_acc": -s.early.best, "bad_epochs": s.early.bad_epochs})
    s.state.epoch, s.state.epoch_step = s.state.epoch + 1, 0
    _checkpoint(s)


def _train(s: Session) -> str:
    """Epochs until the end; returns why training stopped: done | early_stop | max_steps | signal."""
    while (reason := training_over(s.cfg.run, s.state, s.early)) is None:
        reason = _train_epoch(s)
        if reason is not None:
            return reason
        _end_epoch(s)
        if agree_after_step(s.accelerator, s.stop.requested):
            return "signal"
    return reason


def _finish(s: Session, reason: str) -> dict:
    """Test accuracy with the best weights (``run.test_on_best``) and results.json."""
    acc = s.accelerator
    best = s.cfg.run.test_on_best and load_weights(acc, s.model, s.run_dir / BEST_DIR)
    test_loader = _loader(s.cfg, acc, "test")
    try:
        cm = evaluate_classifier(acc, s.model, test_loader, len(s.class_names))
    finally:
        test_loader.close()
    cfg = s.cfg
    results = {
        "kind": "supervised", "model": cfg.model.kind, "arch": cfg.model.arch, "lr": cfg.optim.lr,
        "fraction": cfg.fraction, "seed": cfg.run.seed, "val_acc": -s.early.best if s.early.best_epoch >= 0 else 0.0,
        "best_epoch": s.early.best_epoch, "epochs": s.state.epoch, "steps": s.state.step, "stopped": reason,
        "tested_weights": "best" if best else "last", "test_acc": accuracy(cm),
        "test_balanced_acc": balanced_accuracy(cm),
        "per_class_recall": dict(zip(s.class_names, per_class_recall(cm), strict=True)),
        "confusion": cm.tolist(), "class_names": s.class_names, "num_processes": acc.num_processes,
        "config": to_dict(cfg),
    }  # fmt: skip
    _log(s, "test", {"acc": results["test_acc"], "balanced_acc": results["test_balanced_acc"]})
    if acc.is_main_process:
        write_text(s.run_dir / RESULTS, json.dumps(results, indent=1))
    logger.info("%s lr %g fraction %g seed %d: val %.4f, test %.4f (%s)", cfg.model.arch, cfg.optim.lr,
                cfg.fraction, cfg.run.seed, results["val_acc"], results["test_acc"], reason)  # fmt: skip
    return results


def run(cfg: SupervisedConfig) -> int:
    """Train (or resume) the run of ``cfg`` to its end; returns the exit code (0, or 124 when stopped)."""
    if (Path(cfg.run_dir) / RESULTS).is_file():
        logger.info("%s is finished (results.json exists); nothing to do", cfg.run_dir)
        return EXIT_OK
    accelerator = build_accelerator(cfg.run, cfg.run_dir)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one log, from the main process
    with StopSignal() as stop:
        s = _setup(cfg, accelerator, stop)
        try:
            reason = _train(s)
            if reason == "signal":
                mark_stopped(accelerator, stop, cfg.run_dir, s.state.step)  # job scripts requeue on it
                return EXIT_REQUEUE
            _finish(s, reason)
            return EXIT_OK
        finally:
            accelerator.end_training()
            s.train_loader.close()
            s.val_loader.close()


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
