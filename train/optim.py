"""The optimizer and its learning rate: parameter groups under the one no-weight-decay rule, AdamW, and the
warmup + cosine schedule every task builds (``make_schedule``), positioned by images trained."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from radstream.bucketing.schedule import REFERENCE_TOKENS
from radstream.train.config import OptimConfig

NO_DECAY_TOKENS = ("pos_embed", "cls_token", "mask_token")
"""Learned tokens and tables that weight decay would pull towards zero for no benefit (timm, MAE)."""


def no_weight_decay(name: str, param: torch.nn.Parameter) -> bool:
    """Whether AdamW leaves ``param`` undecayed: norms and biases (1-d) and the learned tokens and position
    tables (the last part of the name is one of ``NO_DECAY_TOKENS``), for every task alike."""
    return param.ndim <= 1 or name.rpartition(".")[2] in NO_DECAY_TOKENS


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: weight decay on matrices only (``no_weight_decay``)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if no_weight_decay(name, param) else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    groups: list[dict], betas: Sequence[float], lr: float, *, fused: bool = False
) -> torch.optim.AdamW:
    """AdamW over a task's parameter groups (``param_groups`` unless the task has its own).

    Args:
        fused: one fused kernel for the whole update (for CUDA training: far fewer launches than the
            per-tensor loop); the CPU keeps torch's default implementation.
    """
    return torch.optim.AdamW(groups, lr=lr, betas=(betas[0], betas[1]), fused=True if fused else None)


@dataclass(frozen=True)
class Schedule:
    """Numbers derived from the config and the world size; computed at run time, never written back."""

    global_batch: float
    """Images per optimizer step, all processes: mean device batch x processes x grad_accum_steps (the mean
    over the epoch's steps: ``batch_size`` without a token budget, the bins' real mean with one)."""
    peak_lr: float
    """Absolute learning rate after the warmup (``OptimConfig.peak_lr``: per 256 images or absolute)."""
    steps_per_epoch: int
    """Optimizer steps per epoch (the loader's batches // grad_accum_steps)."""
    total_steps: int
    """Optimizer steps over all epochs: the length of the cosine schedule."""
    warmup_steps: int
    """Linear warmup steps (never more than ``total_steps``)."""
    min_lr: float = 0.0
    """Where the cosine ends."""
    constant: bool = False
    """Flat at ``peak_lr`` after the warmup instead of the cosine."""

    def lr_step(self, images: int) -> int:
        """The step of this schedule at which ``images`` images have been trained (``LoopState.images``):
        equal to the optimizer steps done while the global batch never changed."""
        return math.floor(images / self.global_batch + 1e-9)  # a mean global batch (token budget) is a float

    def lr(self, step: int) -> float:
        """Learning rate of optimizer step ``step`` (0-based)."""
        if self.constant and step >= self.warmup_steps:
            return self.peak_lr
        return lr_at(step, peak_lr=self.peak_lr, min_lr=self.min_lr, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps)  # fmt: skip


def make_schedule(
    optim: OptimConfig, epochs: int, batch_size: float, loader_batches: int, num_processes: int,
    step_tokens: float | None = None,
) -> Schedule:  # fmt: skip
    """The run's step counts and absolute LR: the one schedule builder of every task.

    Args:
        optim: optimizer settings (LR and its rule, schedule, warmup, accumulation).
        epochs: training epochs.
        batch_size: images per device batch, averaged over the epoch's steps (the train loader's
            ``mean_batch_size``): the schedule's position in images (``LoopState.images``).
        loader_batches: the train loader's batches per epoch (equal on every rank).
        num_processes: the world size.
        step_tokens: real patches per device batch averaged over the epoch's steps, padding excluded (the
            loader's ``mean_step_tokens``). With the per-256 rule the peak LR is lr x (global patches / 196) /
            256: MAE's rule in reference 224x224 images, which is the image count at 224x224 and gives every
            bin of a token budget the LR of the patches it holds. None: the global batch in images.

    Raises:
        ValueError: an epoch is shorter than one optimizer step.
    """
    accum = optim.grad_accum_steps
    steps_per_epoch = optimizer_steps(loader_batches, accum)
    global_batch = batch_size * num_processes * accum
    total = steps_per_epoch * epochs
    warmup = (
        optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_epochs * steps_per_epoch)
    )
    lr_batch = step_tokens * num_processes * accum / REFERENCE_TOKENS if step_tokens else global_batch
    return Schedule(
        global_batch, optim.peak_lr(lr_batch), steps_per_epoch, total, min(warmup, total), optim.min_lr,
        constant=optim.schedule == "constant",
    )  # fmt: skip


def optimizer_steps(loader_batches: int, accum: int) -> int:
    """Optimizer steps in an epoch of ``loader_batches`` with ``accum`` micro-batches a step.

    Raises:
        ValueError: an epoch is shorter than one optimizer step.
    """
    steps = loader_batches // accum  # the tail of an epoch never makes a step across epochs
    if steps < 1:
        raise ValueError(f"{loader_batches} batches per epoch make no step of {accum} accumulated batches")
    return steps


def lr_at(step: int, *, peak_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``peak_lr``, then cosine to ``min_lr``.

    The first step already has a non-zero rate (``peak_lr / warmup_steps``); the last has ``min_lr``.
    """
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps - 1, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group: ``lr`` times the group's ``lr_scale`` (1 when absent;
    fine-tuning's layer-wise decay sets it per block)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
