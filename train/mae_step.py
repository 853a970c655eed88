"""The MAE task's step pieces: reproducible mask noise, border-aware background, one optimizer step with the
MAE's token counters, and the evaluation of a split (loss, pixel MSE, reconstruction samples for the grid).

``radstream.train.pretrain`` wires them into the trainer as the MAE task.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from accelerate import Accelerator

from radstream.shards.images import unit_float
from radstream.train.mae import EVAL_SUMS, MAE, background_patches
from radstream.train.masking import patch_errors, patchify
from radstream.train.steps import StepStats, accumulate_step, split_sums
from radstream.train.visualize import masked_images


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


def batch_background(model: MAE, batch: dict, imgs: torch.Tensor | None = None) -> torch.Tensor | None:
    """[B, L] pure-background patches of a batch (pixels and the loader's foreground boxes), when the model
    masks border-aware; else None. ``imgs``: the batch's float images when already converted."""
    if not model.cfg.border_aware:
        return None
    imgs = unit_float(batch["image"]) if imgs is None else imgs
    boxes = batch.get("foreground")
    return background_patches(imgs, model.patch_size, model.cfg.border_threshold, boxes=boxes)


@dataclass
class MAEStepStats(StepStats):
    """What one MAE optimizer step did on this rank: the generic stats plus token counters."""

    patches: int = 0
    """Patch tokens in the images (all patches, before masking)."""
    encoder_tokens: torch.Tensor | float = 0.0
    """Tokens the encoder saw (visible patches + CLS), summed over images (a device tensor: no sync)."""
    skipped_tokens: torch.Tensor | int = 0
    """Background patches border-aware masking kept out of the encoder and the loss (a device tensor)."""

    def counts(self) -> dict[str, torch.Tensor | float]:
        return {
            "patches": self.patches,
            "encoder_tokens": self.encoder_tokens,
            "skipped": self.skipped_tokens,
        }

    @staticmethod
    def rates(counts: dict[str, float], images: float, seconds: float) -> dict[str, float]:
        return {
            "tokens_per_s": counts["patches"] / seconds,
            "encoder_tokens_per_image": counts["encoder_tokens"] / max(images, 1.0),
            "tokens_skipped": counts["skipped"],
        }


def train_step(
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Sequence[dict],
    *,
    seed: int,
    step: int,
    grad_clip: float | None = None,
) -> MAEStepStats:
    """One optimizer step over ``batches`` (``grad_accum_steps`` micro-batches), masks from ``step_noise``.

    Raises:
        RuntimeError: the accelerator's accumulation counter is out of step with ``len(batches)``.
    """
    mae = accelerator.unwrap_model(model)
    stats = MAEStepStats(loss=torch.zeros(()))

    def loss_of(micro: int, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        imgs = unit_float(batch["image"])  # the stored integers become [0, 1] floats here, on the device
        background = batch_background(mae, batch, imgs)
        length = imgs.shape[-2] * imgs.shape[-1] // mae.patch_size**2
        noise = step_noise(seed, step, micro, accelerator.process_index, (imgs.shape[0], length))
        out = model(imgs, background=background, noise=noise.to(imgs.device), valid=batch["valid"].bool())
        n = imgs.shape[0]
        stats.images += n
        stats.patches += n * length
        stats.encoder_tokens = stats.encoder_tokens + n * out.stats["encoder_tokens"].detach()
        if background is not None:
            stats.skipped_tokens = stats.skipped_tokens + background.sum()
        stats.keys.extend(batch["key"])
        # the sum over this rank's scored patches: accumulate_step divides by the step's global count
        return out.loss * out.loss_count.clamp_min(1.0), out.loss_count

    stats.loss, stats.grad_norm = accumulate_step(
        accelerator, model, optimizer, batches, loss_of, step=step, grad_clip=grad_clip
    )
    return stats


@dataclass
class EvalResult:
    """Loss and pixel MSE over the scored (masked, non-background) patches of a split, all ranks."""

    loss: float
    """The training objective (normalised pixels when norm_pix_loss)."""
    mse_masked: float | None
    """MSE in [0, 1] pixel space over every hidden patch, background included: the study's test MSE (None
    with norm_pix_loss)."""
    mse_foreground: float | None
    """MSE in [0, 1] pixel space over the scored (hidden, foreground) patches (None with norm_pix_loss)."""
    images: int
    """Distinct images evaluated (padded repeats excluded), all ranks."""
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    """Up to ``keep`` (original, masked patches, reconstruction) [1, H, W] on the CPU, this rank's first."""


def evaluate(
    accelerator: Accelerator, model: torch.nn.Module, loader, *, seed: int, keep: int = 0
) -> EvalResult:
    """MAE loss and pixel MSE of a whole split with fixed per-image masks (``key_noise``), through the one
    evaluation skeleton (``radstream.train.steps.split_sums``: every rank must call it)."""
    mae = accelerator.unwrap_model(model)
    samples: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def sums(batch: dict) -> torch.Tensor:
        imgs, valid, noise = _keyed_inputs(mae, batch, seed)
        out = model(imgs, background=batch_background(mae, batch, imgs), noise=noise)
        imgs_kept, pred, mask = imgs[valid], out.pred[valid], out.mask[valid]
        if len(samples) < keep and len(imgs_kept):
            samples.extend(_grid_samples(mae, imgs_kept, pred, mask, keep - len(samples)))
        return mae.eval_sums(imgs, out, valid)

    total = split_sums(accelerator, model, loader, sums, len(EVAL_SUMS))
    return EvalResult(**mae.eval_means(total), samples=samples)


def _keyed_inputs(mae: MAE, batch: dict, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """An evaluated batch's [0, 1] images, valid flags and mask noise by image key (``key_noise``), on the
    images' device."""
    imgs, valid = unit_float(batch["image"]), batch["valid"].bool()
    length = imgs.shape[-2] * imgs.shape[-1] // mae.patch_size**2
    return imgs, valid, key_noise(seed, batch["key"], length).to(imgs.device)


def _grid_samples(
    mae: MAE, imgs, pred, mask, n: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """(original, masked, reconstruction) of the first ``n`` images, float32 [1, H, W] on the CPU."""
    imgs, pred, mask = imgs[:n], pred[:n], mask[:n]
    recon = mae.to_image(imgs, pred, mask).float().clamp(0, 1)
    masked = masked_images(imgs.float(), mask, mae.patch_size)
    return [(imgs[i].float().cpu(), masked[i].cpu(), recon[i].cpu()) for i in range(len(imgs))]


STUDY_MASK_RATIO = 0.75
STUDY_MASK_SEED = 20_251_207
"""The study MSE's masks: a uniform random 75% of all patches per image, a pure function of this seed and
the image's key (``key_noise``), so every model of one dataset is scored on the same hidden patches."""


def objective_name(mae: MAE) -> str:
    """What a run's own loss is, by name (border-aware runs score only the masked foreground patches)."""
    what = "normalised-patch MSE" if mae.cfg.norm_pix_loss else "pixel MSE"
    where = "masked foreground patches" if mae.cfg.border_aware else "masked patches"
    return f"{what}, {where}"


def study_mse(accelerator: Accelerator, model: torch.nn.Module, loader) -> float | None:
    """The study's one MSE for every MAE: [0, 1] pixels, over the hidden patches of a uniform random 75%
    mask of ALL patches (``STUDY_MASK_SEED``; no border-aware background), valid images of all ranks.

    A border-aware run never scores its background patches in training, so its own masks would enter
    untrained predictions into an all-masked MSE; one mask rule for every model makes the number comparable.
    None with norm_pix_loss: its predictions are normalised patches, and un-normalising them would need the
    hidden patch's own statistics. Every rank must call it.
    """
    mae = accelerator.unwrap_model(model)
    if mae.cfg.norm_pix_loss:
        return None

    def sums(batch: dict) -> torch.Tensor:
        imgs, valid, noise = _keyed_inputs(mae, batch, STUDY_MASK_SEED)
        background = torch.zeros(noise.shape, dtype=torch.bool, device=imgs.device)
        out = model(imgs, mask_ratio=STUDY_MASK_RATIO, background=background, noise=noise)
        hidden = out.hidden.float() * valid[:, None].float()
        errors = patch_errors(out.pred.float(), patchify(imgs.float(), mae.patch_size))
        return torch.stack([(errors * hidden).sum().double(), hidden.sum().double()])

    total, count = split_sums(accelerator, model, loader, sums, 2).tolist()
    return total / max(count, 1.0)
