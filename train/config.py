"""Configuration of MAE pretraining (``accelerate launch -m train.pretrain``).

One frozen dataclass per component, nested in ``PretrainConfig``. Values derived from the config (the absolute
learning rate, the global batch, the warmup in steps) are computed at run time by ``train.loop`` and never
written back here. ``RunConfig`` and ``CheckpointConfig`` are shared by every task of ``train.trainer``
(``train.supervised`` nests them too).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from omegaconf import MISSING

from shards.loader_config import LoaderConfig
from train.mae import MAEConfig

PRECISIONS = ("no", "fp16", "bf16")
COMPILE_BACKENDS = ("inductor", "aot_eager", "eager")
"""torch.compile backends a run may name: inductor generates kernels; aot_eager and eager trace the same
graphs without code generation (the CPU tests count graphs and breaks with them in seconds)."""


@dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay, stepped per optimizer step."""

    base_lr: float = 1.5e-4
    """Learning rate per 256 images: the absolute rate is ``base_lr x global batch / 256`` (MAE's rule), with
    global batch = ``loader.batch_size x processes x grad_accum_steps``."""
    weight_decay: float = 0.05
    """AdamW decoupled weight decay on weight matrices (none on norms, biases, position/CLS/mask tokens)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    """AdamW (beta1, beta2)."""
    warmup_epochs: float = 5.0
    """Linear warmup length in epochs (converted to steps with the steps per epoch); see ``warmup_steps``."""
    warmup_steps: int | None = None
    """Linear warmup length in optimizer steps; overrides ``warmup_epochs`` when given."""
    min_lr: float = 0.0
    """The absolute learning rate the cosine decays to at the last step."""
    grad_clip: float | None = None
    """Clip the global gradient norm to this value (None: no clipping, as MAE)."""
    grad_accum_steps: int = 1
    """Loader batches accumulated into one optimizer step."""

    def __post_init__(self) -> None:
        if self.base_lr < 0 or self.min_lr < 0:
            raise ValueError(
                f"optim.base_lr and optim.min_lr must be >= 0, got {self.base_lr}, {self.min_lr}"
            )
        if self.weight_decay < 0:
            raise ValueError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two values in [0, 1), got {self.betas}")
        if self.warmup_epochs < 0 or (self.warmup_steps is not None and self.warmup_steps < 0):
            raise ValueError("optim.warmup_epochs and optim.warmup_steps must be >= 0")
        if self.grad_clip is not None and self.grad_clip <= 0:
            raise ValueError(f"optim.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.grad_accum_steps < 1:
            raise ValueError(f"optim.grad_accum_steps must be >= 1, got {self.grad_accum_steps}")


@dataclass(frozen=True)
class RunConfig:
    """Length, precision, devices, logging and early stopping of a run."""

    epochs: int = 100
    """Training epochs; the LR schedule spans exactly these (early stopping may end the run sooner)."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in total (checkpoint, test, summary) without changing the LR
    schedule; for smoke tests and time-boxed jobs. None: run all epochs."""
    patience: int = 10
    """Early stopping: stop after this many epochs without a better validation loss (the study's 10);
    0 disables it."""
    min_delta: float = 0.0
    """A validation loss counts as better only when below the best by more than this."""
    seed: int = 0
    """Seed of the model initialisation and of the MAE masks (a pure function of seed, step and rank)."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16"; passed to ``Accelerator``."""
    compile: bool = False
    """Compile the model with torch.compile through Accelerate: static shapes, one graph per bin shape (and
    per train / eval mode), see ``train.loop.dynamo_plugin``."""
    compile_backend: str = "inductor"
    """torch.compile's backend, one of COMPILE_BACKENDS."""
    cpu: bool = False
    """Force the CPU even where a GPU is present (tests, CPU runs; several processes use gloo)."""
    log_every: int = 10
    """Optimizer steps between metric lines in metrics.jsonl and TensorBoard."""
    grid_images: int = 8
    """Fixed validation images shown in the reconstruction grid written to samples/ every epoch (0: none)."""
    tensorboard: bool = True
    """Log metrics to TensorBoard through Accelerate's tracker (run_dir/tensorboard)."""
    test_on_best: bool = True
    """Evaluate the test split with the weights of the best validation epoch (else the last weights)."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"run.epochs must be >= 1, got {self.epochs}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"run.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("run.patience and run.min_delta must be >= 0")
        if self.mixed_precision not in PRECISIONS:
            raise ValueError(f"run.mixed_precision must be one of {PRECISIONS}, got {self.mixed_precision!r}")
        if self.compile_backend not in COMPILE_BACKENDS:
            raise ValueError(
                f"run.compile_backend must be one of {COMPILE_BACKENDS}, got {self.compile_backend!r}"
            )
        if self.log_every < 1 or self.grid_images < 0:
            raise ValueError("run.log_every must be >= 1 and run.grid_images >= 0")


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
class PretrainConfig:
    """MAE pretraining: data, model, optimizer, run and checkpoints."""

    shards: str = MISSING
    """Root of a finalized shard dataset (holds manifest.json); required."""
    run_dir: str = MISSING
    """Output directory: config.yaml, metrics.jsonl, checkpoints/, samples/, tensorboard/, summary.json.
    A run started again with the same run_dir resumes from checkpoints/latest."""
    model: MAEConfig = field(default_factory=MAEConfig)
    """The MAE (encoder, decoder, masking; border-aware masking is ``model.border_aware``)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """The streaming loader, built per rank."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and LR schedule."""
    run: RunConfig = field(default_factory=RunConfig)
    """Run length, precision, devices, logging, early stopping."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint cadence and retention."""

    def __post_init__(self) -> None:
        for name in ("shards", "run_dir"):
            if not getattr(self, name) or getattr(self, name) == MISSING:
                raise ValueError(f"{name} is required (e.g. {name}=/path)")
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
