"""The probe's config (``ProbeConfig``, the keys of ``radstream.eval.probe``'s recipe) and the embeddings it probes
(``ProbeData``); shared by ``radstream.eval.probe`` (the stage) and ``radstream.eval.probe_grid`` (its batched engine)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import MISSING

SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class ProbeConfig:
    """``radstream.eval.probe``: the grid of linear heads over one embedding store."""

    embeddings: str = MISSING
    """The zarr store written by ``radstream.eval.embed``."""
    out: str = MISSING
    """Run folder for the results."""
    aggregations: list[str] = field(default_factory=lambda: ["flattened", "mean", "cls"])
    """Which stored aggregations to probe."""
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    """Training subsets: label fractions stored with the embeddings (the dataset's nested fractions)."""
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    """Seeds of head initialisation and batch order; results are mean ± std over them."""
    lr_min: float = 3e-4
    """Smallest learning rate of the grid."""
    lr_max: float = 3.0
    """Largest learning rate of the grid."""
    num_lrs: int = 10
    """Learning rates, log-spaced from lr_min to lr_max (the study searched 10)."""
    batch_size: int = 256
    """Largest batch; an epoch of n samples is cut into ceil(n / batch_size) near-equal batches."""
    max_epochs: int = 100
    """Epochs per data group at most; the cosine schedule spans them."""
    patience: int = 10
    """Early stopping: a head stops after this many validations (one per epoch of its data group) without a
    better validation accuracy (0: never); never before ``min_steps``."""
    min_steps: int = 0
    """The fewest SGD steps of every head, whatever its fraction (``radstream.eval.probe_grid.group_epochs``): at 1% an
    epoch can be one step; ``max_epochs`` is raised to cover them. The study's protocols set it as every
    trained model's ``run.min_steps``."""
    schedule: str = "cosine"
    """Learning-rate schedule per head: "cosine" (to 0 over max_epochs) or "constant"."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 0.0
    """L2 weight decay (MAE's linear probe uses none)."""
    bn_eps: float = 1e-6
    """BatchNorm epsilon (MAE's linear probe: 1e-6)."""
    bn_momentum: float | None = None
    """None: the BatchNorm evaluates with the exact mean and variance of the head's whole training subset
    (frozen features: they are known before training). A number: torch's running average with this momentum
    (0.1 is torch's default; far from the data after the few steps of a small label fraction)."""
    knn_k: int = 20
    """Neighbours of the kNN evaluation run beside the probes (``radstream.eval.knn``, DINO's 20); 0: no kNN."""
    knn_temperature: float = 0.07
    """kNN votes weigh exp(cosine similarity / this) (DINO's 0.07)."""
    eval_batch_size: int = 4096
    """Rows scored at a time."""
    device: str = "auto"
    """"auto" (CUDA when available), "cpu" or "cuda"."""

    def __post_init__(self) -> None:
        for name in ("embeddings", "out"):
            if not getattr(self, name) or getattr(self, name) == MISSING:
                raise ValueError(f"{name} is required")
        if not self.aggregations or not self.label_fractions or not self.seeds:
            raise ValueError("aggregations, label_fractions and seeds must not be empty")
        if not 0 < self.lr_min <= self.lr_max or self.num_lrs < 1:
            raise ValueError(f"need 0 < lr_min <= lr_max and num_lrs >= 1, got {self.lr_min}, {self.lr_max}")
        if (
            min(self.batch_size, self.max_epochs, self.eval_batch_size) < 1
            or min(self.patience, self.min_steps) < 0
        ):
            raise ValueError(
                "batch_size, max_epochs and eval_batch_size must be >= 1, patience and min_steps >= 0"
            )
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if not 0 <= self.momentum < 1 or self.weight_decay < 0:
            raise ValueError("momentum must be in [0, 1) and weight_decay >= 0")
        if self.knn_k < 0 or self.knn_temperature <= 0:
            raise ValueError("knn_k must be >= 0 and knn_temperature > 0")


@dataclass
class ProbeData:
    """Labelled embeddings of the three splits, on the probing device."""

    features: dict[str, dict[str, torch.Tensor]]
    """split -> aggregation -> float32 [N, D]."""
    labels: dict[str, torch.Tensor]
    """split -> int64 [N]."""
    train_fractions: np.ndarray
    """bool [N_train, F]: training row i is in label fraction ``levels[j]``."""
    levels: list[float]
    class_names: list[str]
    train_keys: np.ndarray | None = None
    """object [N_train]: the training rows' sample keys (seed k >= 1 draws its own labelled subset)."""
    train_patients: np.ndarray | None = None
    """object [N_train]: their patient ids, from the shard dataset's samples table (None: not found, and
    only seed 0, the build's subset, can be probed below 100%)."""
