"""The configuration every training run shares, and MAE pretraining's (``accelerate launch -m radstream.train.pretrain``).

One frozen dataclass per component. ``BaseRunConfig`` (data, run folder, loader, run, checkpoints) is the base
of every task's config (``PretrainConfig`` here, ``radstream.train.supervised``'s and ``radstream.train.finetune``'s), and
``OptimConfig`` (AdamW, the LR rule, the schedule, the sweep) its optimizer's. Values derived from the config
(the absolute learning rate, the global batch, the warmup in steps) are computed at run time by
``radstream.train.optim.make_schedule`` and never written back here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING

from radstream.shards.loader_config import LoaderConfig
from radstream.train.mae import MAEConfig
from radstream.train.sweep import STUDY_LR_GRID

PRECISIONS = ("no", "fp16", "bf16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""torch.compile backends a run may name: inductor generates kernels; aot_eager and eager trace the same
graphs without code generation (the CPU tests count graphs and breaks with them in seconds)."""


LR_RULES = ("absolute", "per_256")
SCHEDULES = ("cosine", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay (or a constant rate), stepped per optimizer step; every
    task's optimizer (a task's config may subclass it for its own loss settings and defaults)."""

    lr: float = 1e-4
    """The learning rate, read by ``lr_rule``."""
    lr_rule: str = "absolute"
    """How ``lr`` becomes the peak rate: "absolute" (``lr`` itself) or "per_256" (``lr x global batch / 256``,
    MAE's rule, with global batch = images per device batch x processes x ``grad_accum_steps``)."""
    lr_grid: Any = None
    """Rates to sweep in this one command: a list, or "study" (the study's ten, ``radstream.train.sweep.STUDY_LR_GRID``);
    each trains into ``run_dir/lr-<rate>`` (replacing ``lr``, read by the same ``lr_rule``), one after
    another, each resumed when restarted; ``radstream report run_dir`` then picks the rate on validation.
    None: the one ``lr``."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay on weight matrices (none on norms, biases, position/CLS/mask tokens:
    ``radstream.train.optim.no_weight_decay``)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW (beta1, beta2)."""
    schedule: str = "cosine"
    """"cosine" (linear warmup, then cosine to ``min_lr`` over run.epochs) or "constant" (warmup, then flat)."""
    warmup_epochs: float = 0.0
    """Linear warmup length in epochs (converted to steps with the steps per epoch); see ``warmup_steps``.
    The warmup never exceeds the run's total steps."""
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps; overrides ``warmup_epochs`` when given."""
    min_lr: float = 0.0
    """The absolute learning rate the cosine decays to at the last step."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None: no clipping)."""
    grad_accum_steps: int = 1
    """Loader batches accumulated into one optimizer step."""

    def __post_init__(self) -> None:
        if self.lr < 0 or self.min_lr < 0:
            raise ValueError(f"optim.lr and optim.min_lr must be >= 0, got {self.lr}, {self.min_lr}")
        if self.lr_rule not in LR_RULES:
            raise ValueError(f"optim.lr_rule must be one of {LR_RULES}, got {self.lr_rule!r}")
        self.rates()  # checks lr_grid
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError("optim.warmup_epochs and optim.warmup_steps must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")

    def peak_lr(self, global_batch: float) -> float:
        """The absolute rate after the warmup, for ``global_batch`` images per optimizer step."""
        return self.lr * global_batch / 256 if self.lr_rule == "per_256" else self.lr

    def rates(self) -> list[float] | None:
        """The rates of ``lr_grid`` (None: no sweep).

        Raises:
            ValueError: a grid that is neither "study" nor a non-empty list of rates > 0.
        """
        grid = self.lr_grid
        if grid is None:
            return None
        if grid == "study":
            return list(STUDY_LR_GRID)
        if isinstance(grid, str) or not grid or not all(isinstance(r, (int, float)) and r > 0 for r in grid):
            raise ValueError(f'optim.lr_grid must be a list of rates > 0, "study" or null, got {grid}')
        return [float(r) for r in grid]


@dataclass(frozen=True)
class RunConfig:
    """Length, precision, devices, logging and early stopping of a run."""

    epochs: int = 100
    """Training epochs; the LR schedule spans exactly these (early stopping may end the run sooner)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (checkpoint, test, summary) without changing the LR
    schedule; for smoke tests and time-boxed jobs. None: run all epochs."""
    patience: int = 10
    """Early stopping: stop after this many validations (at epochs' ends, see ``val_every_steps``) without a
    better validation score (the study's 10): the task's own score, the loss for MAE pretraining, the accuracy
    for classifiers and fine-tuning; 0 disables it. It never stops a run before ``min_steps``."""
    val_every_steps: int = 0
    """Validate (early stopping, best weights, the epoch's checkpoint) at an epoch's end only once at least this
    many optimizer steps have passed since the last validation, and always at the last epoch; 0: at every
    epoch's end. At a small label fraction an epoch is one or a few steps, and a validation of the whole
    validation split after each would cost more than the training (``radstream study`` sets a fifth of
    ``min_steps``)."""
    min_steps: int = 0
    """The fewest optimizer steps of a run, whatever its label fraction: ``epochs`` is raised to cover them
    (at 1% an epoch can be one step, and a few steps leave a network from scratch, and its BatchNorm
    statistics, untrained) and early stopping cannot end the run before them. 0: no minimum."""
    min_delta: float = 0.0
    """A validation score counts as better only when better than the best by more than this."""
    seed: int = 0
    """Seed of the model initialisation and of the MAE masks (a pure function of seed, step and rank)."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16"; passed to ``Accelerator``."""
    compile: bool = False
    """Compile the model with torch.compile through Accelerate: static shapes, one graph per bin shape (and
    per train / eval mode), see ``radstream.train.steps.dynamo_plugin``."""
    compile_backend: str = "inductor"
    """torch.compile's backend, one of COMPILE_BACKENDS."""
    cpu: bool = False
    """Force the CPU even where a GPU is present (tests, CPU runs; several processes use gloo)."""
    log_every: int = 10
    """Optimizer steps between metric lines in metrics.jsonl and TensorBoard."""
    tensorboard: bool = True
    """Log metrics to TensorBoard through Accelerate's tracker (run_dir/tensorboard)."""
    test_on_best: bool = True
    """Evaluate the test split with the weights of the best validation epoch (else the last weights)."""
    deterministic: bool = False
    """torch's deterministic algorithms (``use_deterministic_algorithms``, warning where an op has none) and
    a fixed cuBLAS workspace: a rerun on the same machine gives the same bits on a GPU too, at some speed.
    Without it a CPU run is already bit-identical on the same machine; see README "Reproducibility"."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"run.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"run.max_steps must be >= 1 or None, got {self.max_steps}")
        if min(self.patience, self.min_delta, self.min_steps, self.val_every_steps) < 0:
            raise ValueError(
                "run.patience, run.min_delta, run.min_steps and run.val_every_steps must be >= 0"
            )
        if self.mixed_precision in (
            "False",
            "false",
        ):  # YAML 1.1 reads a bare `no` (run.mixed_precision=no) as false
            object.__setattr__(self, "mixed_precision", "no")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"run.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"run.compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}"
            )
        if self.log_every < 1:
            raise ValueError(f"run.log_every must be >= 1, got {self.log_every}")


@dataclass(frozen=True)
class MAERunConfig(RunConfig):
    """The run of MAE pretraining: a ``RunConfig`` and the reconstruction grid only this task draws."""

    grid_images: int = 8
    """Fixed validation images shown in the reconstruction grid written to samples/ every epoch (0: none)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.grid_images < 0:
            raise ValueError(f"run.grid_images must be >= 0, got {self.grid_images}")


@dataclass(frozen=True)
class CheckpointConfig:
    """When checkpoints are written and how many are kept."""

    every_steps: int = 1000
    """Optimizer steps between checkpoints (0: only at epoch ends); one is always written at every epoch
    end, on SIGTERM/SIGUSR1 and at the end of the run."""
    keep_last: int = 3
    """Checkpoints kept under run_dir/checkpoints (older ones are deleted after a new one is complete)."""

    def __post_init__(self) -> None:
        if self.every_steps < 0:
            raise ValueError(f"checkpoint.every_steps must be >= 0, got {self.every_steps}")
        if self.keep_last < 1:
            raise ValueError(f"checkpoint.keep_last must be >= 1, got {self.keep_last}")


@dataclass(frozen=True)
class BaseRunConfig:
    """What every training run of ``radstream.train.trainer`` has: its data, its folder, the loader, the run and its
    checkpoints. A task's config subclasses it and adds ``model`` and ``optim`` (an ``OptimConfig``)."""

    shards: str = MISSING
    """Root of a finalized shard dataset (holds manifest.json); required."""
    run_dir: str = MISSING
    """Output directory (``radstream.train.run_layout``): config.yaml, metrics.jsonl, checkpoints/, best/, the results
    file. A run started again with the same run_dir resumes from checkpoints/latest."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """The streaming loader, built per rank; ``loader.label_fraction`` is a classifier's regime (None = all
    labels, 0.01 = the study's 1%)."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length, precision, devices, logging, early stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""

    def __post_init__(self) -> None:
        for name in ("shards", "run_dir"):
            if not getattr(self, name) or getattr(self, name) == MISSING:
                raise ValueError(f"{name} is required (e.g. {name}=/path)")

    @property
    def fraction(self) -> float:
        """The label fraction of the training set this run uses."""
        return 1.0 if self.loader.label_fraction is None else float(self.loader.label_fraction)


@dataclass(frozen=True)
class PretrainConfig(BaseRunConfig):
    """MAE pretraining: data, model, optimizer, run and checkpoints."""

    model: MAEConfig = field(default_factory=MAEConfig)
    """The MAE (encoder, decoder, masking; border-aware masking is ``model.border_aware``)."""
    optim: OptimConfig = field(
        default_factory=lambda: OptimConfig(
            lr=1.5e-4, lr_rule="per_256", betas=[0.9, 0.95], warmup_epochs=5.0
        )
    )
    """Optimizer and LR schedule; by default MAE's: 1.5e-4 per 256 images, betas (0.9, 0.95), 5 warmup epochs."""
    run: MAERunConfig = field(default_factory=MAERunConfig)
    """Run length, precision, devices, logging, early stopping (on the validation loss), reconstruction grids."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loader.patch_size != self._encoder_patch():
            raise ValueError(
                f"loader.patch_size {self.loader.patch_size} differs from the encoder's patch size "
                f"{self._encoder_patch()} ({self.model.encoder})"
            )

    def _encoder_patch(self) -> int:
        """The encoder's patch size, from the timm name ("vit_base_patch16_224" -> 16)."""
        for part in self.model.encoder.split("_"):
            if part.startswith("patch") and part[5:].isdigit():
                return int(part[5:])
        return self.loader.patch_size
