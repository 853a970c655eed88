"""Reusable pieces of a training loop under Accelerate: builders, the LR schedule, one optimizer step,
evaluation, metrics, early stopping, the loop state, exit codes and the stop signal.

Pretraining (``train.pretrain``) composes them; the supervised baselines reuse them. "step" always means an
optimizer step; a loader batch is a micro-batch (``grad_accum_steps`` of them make a step).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import resource
import signal
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, TorchDynamoPlugin

from train.config import OptimConfig, RunConfig
from train.mae import MAE, background_patches, param_groups
from train.visualize import masked_images

logger = logging.getLogger(__name__)

EXIT_OK, EXIT_NON_FINITE, EXIT_BAD_CONFIG, EXIT_REQUEUE = 0, 1, 2, 124
"""Exit codes of the training modules: done, non-finite loss, bad config, stopped by a signal (requeue)."""
STOPPED = "stopped.json"
"""Written when a signal stopped the run (requeue it); removed when the run starts again."""


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite; the run stops without writing a checkpoint."""


def build_accelerator(run: RunConfig, run_dir: str, grad_accum_steps: int = 1) -> Accelerator:
    """The Accelerator of a run: devices, processes, precision, accumulation, compile, TensorBoard in run_dir."""
    return Accelerator(
        cpu=run.cpu,
        mixed_precision=run.mixed_precision,
        gradient_accumulation_steps=grad_accum_steps,
        log_with="tensorboard" if run.tensorboard else None,
        project_config=ProjectConfiguration(project_dir=run_dir, logging_dir=run_dir),
        dynamo_plugin=TorchDynamoPlugin(backend="inductor") if run.compile else None,
    )


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, lr: float) -> torch.optim.AdamW:
    """AdamW over MAE's parameter groups (no weight decay on norms, biases and tokens)."""
    return torch.optim.AdamW(
        param_groups(model, optim.weight_decay), lr=lr, betas=(optim.betas[0], optim.betas[1])
    )


@dataclass(frozen=True)
class Schedule:
    """Numbers derived from the config and the world size; computed at run time, never written back."""

    global_batch: int
    """Images per optimizer step, all processes: batch_size x processes x grad_accum_steps."""
    peak_lr: float
    """Absolute learning rate: base_lr x global_batch / 256."""
    steps_per_epoch: int
    """Optimizer steps per epoch (the loader's batches // grad_accum_steps)."""
    total_steps: int
    """Optimizer steps over all epochs: the length of the cosine schedule."""
    warmup_steps: int
    """Linear warmup steps."""


def make_schedule(
    optim: OptimConfig, epochs: int, batch_size: int, loader_batches: int, num_processes: int
) -> Schedule:
    """The run's step counts and absolute LR.

    Args:
        optim: optimizer settings (base LR, warmup, accumulation).
        epochs: training epochs.
        batch_size: images per device batch (the loader's; its maximum with a token budget).
        loader_batches: the train loader's batches per epoch (equal on every rank).
        num_processes: the world size.

    Raises:
        ValueError: an epoch is shorter than one optimizer step.
    """
    accum = optim.grad_accum_steps
    steps_per_epoch = loader_batches // accum  # the tail of an epoch never makes a step across epochs
    if steps_per_epoch < 1:
        raise ValueError(f"{loader_batches} batches per epoch make no step of {accum} accumulated batches")
    global_batch = batch_size * num_processes * accum
    total = steps_per_epoch * epochs
    warmup = (
        optim.warmup_steps if optim.warmup_steps is not None else round(optim.warmup_epochs * steps_per_epoch)
    )
    return Schedule(
        global_batch, optim.base_lr * global_batch / 256, steps_per_epoch, total, min(warmup, total)
    )


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
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def _seed_of(*parts: object) -> int:
    """A stable 63-bit seed from any parts (Python's hash is salted per process)."""
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def step_noise(seed: int, step: int, micro: int, rank: int, shape: tuple[int, int]) -> torch.Tensor:
    """Training mask noise [N, L] (CPU): a pure function of (seed, step, micro-batch, rank).

    Masks thus never depend on the global RNG, which loaders and libraries also draw from, so a resumed run
    masks exactly as an uninterrupted one, on any device.
    """
    return torch.rand(shape, generator=torch.Generator().manual_seed(_seed_of(seed, step, micro, rank)))


def key_noise(seed: int, keys: Sequence[str], length: int) -> torch.Tensor:
    """Evaluation mask noise [N, L] (CPU), one row per sample key: the same mask for an image in every epoch
    and on any number of processes, so validation losses are comparable."""
    rows = [
        torch.rand(length, generator=torch.Generator().manual_seed(_seed_of(seed, "eval", k))) for k in keys
    ]
    return torch.stack(rows)


def batch_background(model: MAE, batch: dict) -> torch.Tensor | None:
    """[B, L] pure-background patches of a batch (pixels and the loader's foreground boxes), when the model
    masks border-aware; else None."""
    if not model.cfg.border_aware:
        return None
    boxes = batch.get("foreground")
    return background_patches(batch["image"], model.patch_size, model.cfg.border_threshold, boxes=boxes)


@dataclass
class StepStats:
    """What one optimizer step did on this rank."""

    loss: torch.Tensor
    """0-d, mean of the micro-batches' losses (on the device, not synchronised)."""
    images: int = 0
    patches: int = 0
    """Patch tokens in the images (all patches, before masking)."""
    encoder_tokens: torch.Tensor | float = 0.0
    """Tokens the encoder saw (visible patches + CLS), summed over images (a device tensor: no sync)."""
    skipped_tokens: torch.Tensor | int = 0
    """Background patches border-aware masking kept out of the encoder and the loss (a device tensor)."""
    keys: list[str] = field(default_factory=list)
    grad_norm: torch.Tensor | None = None
    """Global gradient norm before clipping (only when clipping)."""


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict],
    *,
    seed: int,
    step: int,
    grad_clip: float | None = None,
) -> StepStats:
    """One optimizer step over ``batches`` (``grad_accum_steps`` micro-batches) with ``accelerator.accumulate``.

    Raises:
        RuntimeError: the accelerator's accumulation counter is out of step with ``len(batches)``.
    """
    mae = accelerator.unwrap_model(model)
    losses, stats = [], StepStats(loss=torch.zeros(()))
    for micro, batch in enumerate(batches):
        imgs = batch["image"]
        background = batch_background(mae, batch)
        length = imgs.shape[-2] * imgs.shape[-1] // mae.patch_size**2
        noise = step_noise(seed, step, micro, accelerator.process_index, (imgs.shape[0], length))
        with accelerator.accumulate(model):
            out = model(imgs, background=background, noise=noise.to(imgs.device))
            accelerator.backward(out.loss)
            if accelerator.sync_gradients != (micro == len(batches) - 1):
                raise RuntimeError(f"gradient accumulation out of step at step {step}, micro-batch {micro}")
            if accelerator.sync_gradients and grad_clip is not None:
                stats.grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(out.loss.detach())
        n = imgs.shape[0]
        stats.images += n
        stats.patches += n * length
        stats.encoder_tokens = stats.encoder_tokens + n * out.stats["encoder_tokens"].detach()
        if background is not None:
            stats.skipped_tokens = stats.skipped_tokens + background.sum()
        stats.keys.extend(batch["key"])
    stats.loss = torch.stack(losses).mean()
    return stats


def agree(accelerator: Accelerator, *flags: bool | torch.Tensor) -> list[bool]:
    """Whether any rank raised each flag: one small all-reduce, so every rank takes the same branch."""
    device = accelerator.device
    values = torch.stack([torch.as_tensor(f, dtype=torch.float32, device=device).reshape(()) for f in flags])
    return [v > 0 for v in accelerator.reduce(values, reduction="sum").tolist()]


def agree_after_step(
    accelerator: Accelerator, stop_requested: bool, stats: StepStats | None = None, step: int | None = None
) -> bool:
    """After a step, agree across ranks whether to stop (any rank got a stop signal) and whether any loss was
    non-finite, in one all-reduce; returns the stop decision.

    Raises:
        NonFiniteLossError: on every rank when any rank's loss is not finite, naming the step and, on the
            rank that saw it, the batch keys.
    """
    bad_here = ~torch.isfinite(stats.loss) if stats is not None else False
    bad_anywhere, stop = agree(accelerator, bad_here, stop_requested)
    if bad_anywhere:
        if bool(bad_here):
            raise NonFiniteLossError(
                f"non-finite loss ({float(stats.loss)}) at step {step} on rank {accelerator.process_index}; "
                f"batch keys: {', '.join(stats.keys)}"
            )
        raise NonFiniteLossError(
            f"non-finite loss at step {step} on another rank (its log names the batch keys)"
        )
    return stop


@dataclass
class EvalResult:
    """Loss and pixel MSE over the scored (masked, non-background) patches of a split, all ranks."""

    loss: float
    """The training objective (normalised pixels when norm_pix_loss)."""
    pixel_mse: float
    """MSE in [0, 1] pixel space: the study's test MSE."""
    images: int
    """Distinct images evaluated (padded repeats excluded), all ranks."""
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Up to ``keep`` (original, masked patches, reconstruction) [1, H, W] on the CPU, this rank's first."""


@torch.no_grad()
def evaluate(
    accelerator: Accelerator, model: torch.nn.Module, loader, *, seed: int, keep: int = 0
) -> EvalResult:
    """MAE loss and pixel MSE of a whole split with fixed per-image masks (``key_noise``).

    Every rank must call it (sums are all-reduced). The loader is reset to epoch 0 so batches, and thus
    border-aware batch masks, are the same every time.
    """
    mae = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    loader.set_epoch(0)
    sums = torch.zeros(4, dtype=torch.float64, device=accelerator.device)  # loss, mse, patches, images
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for batch in loader:
        imgs, valid = batch["image"], batch["valid"].bool()
        length = imgs.shape[-2] * imgs.shape[-1] // mae.patch_size**2
        noise = key_noise(seed, batch["key"], length).to(imgs.device)
        out = model(imgs, background=batch_background(mae, batch), noise=noise)
        imgs, pred, mask = imgs[valid], out.pred[valid], out.mask[valid]
        scored = mask.float().sum()
        # per-batch means weighted by scored patches: the split's mean over all its scored patches
        loss, mse = mae.forward_loss(imgs, pred, mask), mae.pixel_mse(imgs, pred, mask)
        sums += torch.stack([loss * scored, mse * scored, scored, valid.sum().to(scored)]).double()
        if len(samples) < keep and len(imgs):
            samples.extend(_grid_samples(mae, imgs, pred, mask, keep - len(samples)))
    model.train(was_training)
    loss_sum, mse_sum, patches, images = accelerator.reduce(sums, reduction="sum").tolist()
    patches = max(patches, 1.0)
    return EvalResult(loss_sum / patches, mse_sum / patches, int(images), samples)


def _grid_samples(
    mae: MAE, imgs, pred, mask, n: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(original, masked, reconstruction) of the first ``n`` images, float32 [1, H, W] on the CPU."""
    imgs, pred, mask = imgs[:n], pred[:n], mask[:n]
    recon = mae.to_image(imgs, pred, mask).float().clamp(0, 1)
    masked = masked_images(imgs.float(), mask, mae.patch_size)
    return [(imgs[i].float().cpu(), masked[i].cpu(), recon[i].cpu()) for i in range(len(imgs))]


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Meter:
    """Throughput and timing over the steps since the last ``read``."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.steps, self.losses, self.grad_norms = 0, [], []
        self.images = self.patches = 0
        self.encoder_tokens: torch.Tensor | float = 0.0
        self.skipped: torch.Tensor | int = 0
        self.wait_s = self.busy_s = 0.0

    def add(self, stats: StepStats, wait_s: float, step_s: float) -> None:
        """Record one step: its stats, seconds waiting for the loader and seconds in all."""
        self.steps += 1
        self.losses.append(stats.loss.float())
        if stats.grad_norm is not None:
            self.grad_norms.append(torch.as_tensor(stats.grad_norm, dtype=torch.float32))
        self.images += stats.images
        self.patches += stats.patches
        self.encoder_tokens = self.encoder_tokens + stats.encoder_tokens
        self.skipped = self.skipped + stats.skipped_tokens
        self.wait_s += wait_s
        self.busy_s += step_s

    def read(self, accelerator: Accelerator) -> dict[str, float]:
        """Window metrics, loss averaged over ranks, counts summed over ranks; then reset."""
        loss = accelerator.reduce(torch.stack(self.losses).mean().to(accelerator.device), reduction="mean")
        device = accelerator.device
        values = (self.images, self.patches, self.encoder_tokens, self.skipped)
        counts = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in values])
        images, patches, enc, skipped = accelerator.reduce(counts, reduction="sum").tolist()
        seconds = max(self.busy_s, 1e-9)
        out = {
            "loss": float(loss),
            "images_per_s": images / seconds,
            "tokens_per_s": patches / seconds,
            "encoder_tokens_per_image": enc / max(images, 1.0),
            "tokens_skipped": skipped,
            "data_wait_frac": self.wait_s / seconds,
            "peak_memory_mb": peak_memory_mb(accelerator.device),
        }
        if self.grad_norms:  # this rank's (after the all-reduce of gradients it is the same on every rank)
            out["grad_norm"] = float(torch.stack(self.grad_norms).mean())
        self.reset()
        return out


@dataclass
class EarlyStopping:
    """Stop after ``patience`` epochs without a validation loss lower than the best by ``min_delta``."""

    patience: int
    """Epochs without improvement before stopping; 0: never stop."""
    min_delta: float = 0.0
    best: float = math.inf
    best_epoch: int = -1
    bad_epochs: int = 0

    def update(self, loss: float, epoch: int) -> bool:
        """Record an epoch's validation loss; True when it is the new best."""
        if loss < self.best - self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = loss, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience > 0 and self.bad_epochs >= self.patience

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        # patience and min_delta come from the current config, so a resumed run may change them
        self.best, self.best_epoch, self.bad_epochs = (
            float(state["best"]),
            state["best_epoch"],
            state["bad_epochs"],
        )


class StopSignal:
    """Context manager: SIGTERM or SIGUSR1 sets ``requested``; the loop finishes its step, checkpoints and
    exits with code 124 (SLURM requeues on it). The previous handlers come back on exit."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:
        self.requested, self.signum = True, signum

    def __enter__(self) -> StopSignal:
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    epoch: int = 0
    step: int = 0
    """Optimizer steps done in all."""
    epoch_step: int = 0
    """Optimizer steps done in ``epoch``."""


def training_over(run: RunConfig, state: LoopState, early: EarlyStopping) -> str | None:
    """Why training is over at ``state``: early_stop | done | max_steps; None while it goes on."""
    if early.should_stop:
        return "early_stop"
    if state.epoch >= run.epochs:
        return "done"
    if run.max_steps is not None and state.step >= run.max_steps:
        return "max_steps"
    return None


def clear_stopped(accelerator: Accelerator, run_dir: str | os.PathLike[str]) -> None:
    """Remove an earlier stop's ``stopped.json`` (main process): only a stop of this launch counts."""
    if accelerator.is_main_process:
        (Path(run_dir) / STOPPED).unlink(missing_ok=True)


def mark_stopped(
    accelerator: Accelerator, stop: StopSignal, run_dir: str | os.PathLike[str], step: int
) -> None:
    """Log the stop and leave ``run_dir/stopped.json`` (main process), after the checkpoint of ``step``.

    Launchers that do not pass the workers' code 124 on (torchrun exits 1 when a worker fails) still let
    the job script see it should requeue.
    """
    got = f"signal {stop.signum} here" if stop.requested else "signal on another rank"
    logger.warning("stopped at step %d (%s), checkpoint written; exit %d", step, got, EXIT_REQUEUE)
    if accelerator.is_main_process:
        marker = {"step": step, "exit_code": EXIT_REQUEUE, "time": time.time()}
        (Path(run_dir) / STOPPED).write_text(json.dumps(marker))


def stage_main(
    argv, *, prog: str, description: str, config_cls, run, example_recipe: str, example_override: str
) -> int:
    """The thin entry point of a training stage: ``--config`` + ``key=value`` overrides → ``run(cfg)``.

    Returns the exit code: ``run``'s, ``EXIT_BAD_CONFIG`` for a config that does not load, ``EXIT_NON_FINITE``
    when the loss stops being finite.
    """
    import argparse

    from core.config import ConfigError, load_config

    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--config", help=f"recipe YAML, e.g. {example_recipe}")
    parser.add_argument("overrides", nargs="*", help=f"dotted key=value overrides, e.g. {example_override}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # it logs every file of every checkpoint
    try:
        cfg = load_config(config_cls, args.config, args.overrides)
    except ConfigError as err:
        logger.error("bad config: %s", err)
        return EXIT_BAD_CONFIG
    try:
        return run(cfg)
    except NonFiniteLossError as err:
        logger.error("%s", err)
        return EXIT_NON_FINITE
