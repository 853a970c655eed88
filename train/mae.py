"""Masked autoencoder (He et al., 2021) with a timm ViT encoder, for 1-channel images of any bin shape.

Written as the small named steps of facebookresearch/mae ``models_mae.py``: ``patchify``, ``random_masking``
(both in ``radstream.train.masking``), ``forward_encoder``, ``forward_decoder``, ``forward_loss``. Shapes: ``N`` batch,
``C`` channels, ``p`` patch size, ``(h, w)`` the patch grid of the batch's bin, ``L = h*w`` patches, ``D``
encoder width.

Any ``H × W`` that is a multiple of the patch size runs (non-square grids too): positional embeddings are made
per grid (fixed sin-cos, or timm's learned table resampled). Border-aware masking never shows pure-background
patches to the encoder and leaves them out of the loss; every image keeps the mask ratio of its own
foreground, so images of one batch see different numbers of tokens: their rows are padded to the largest keep
count of the bin's grid (a static shape: one compiled graph per bin, no device sync) and a key-padding mask
keeps the padding out of attention (measured against packing in ``benchmarks/masking.py``, the padding's cost
in ``benchmarks/padding.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from radstream.train.masking import (
    attention_mask,
    background_patches,
    grid_of,
    masked_mean,
    patch_errors,
    patch_stats,
    patchify,
    random_masking,
    unpatchify,
    visible_counts,
)
from radstream.train.pos_embed import SinCosPosEmbed, resample_learned
from radstream.train.weights import load_init

_POS_EMBEDS = ("sincos", "learned")


@dataclass(frozen=True)
class MAEConfig:
    """The MAE model."""

    encoder: str = "vit_base_patch16_224"
    """timm ViT name ("vit_tiny_patch16_224" … "vit_large_patch16_224"); created with pretrained=False."""
    embed_dim: int | None = None
    """Override the encoder width (None = the timm model's); with depth/num_heads makes a tiny debug encoder."""
    depth: int | None = None
    """Override the number of encoder blocks (None = the timm model's)."""
    num_heads: int | None = None
    """Override the encoder attention heads (None = the timm model's)."""
    in_chans: int = 1
    """Image channels (radiographs: 1)."""
    decoder_dim: int = 512
    """Decoder width."""
    decoder_depth: int = 8
    """Decoder blocks."""
    decoder_heads: int = 16
    """Decoder attention heads; must divide decoder_dim."""
    mask_ratio: float = 0.75
    """Fraction of patches hidden from the encoder, in [0, 1)."""
    norm_pix_loss: bool = False
    """Regress per-patch normalised pixels (mean 0, var 1) instead of raw pixels."""
    pos_embed: str = "sincos"
    """Encoder positions: "sincos" (fixed 2-D sin-cos per grid) or "learned" (timm's table, resampled)."""
    border_aware: bool = False
    """Find pure-background patches in every batch: never visible, never scored."""
    border_threshold: float = 0.0
    """A patch is background when all its pixels are <= this (pixels in [0, 1])."""
    init: str | None = None
    """Local checkpoint to start from: timm ViT weights (.pth/.bin/.safetensors) or an MAE checkpoint."""

    def __post_init__(self) -> None:
        if not timm.is_model(self.encoder):
            raise ValueError(f"encoder {self.encoder!r} is not a timm model name")
        for name in ("embed_dim", "depth", "num_heads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if self.embed_dim is not None and self.num_heads is not None and self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.in_chans < 1 or min(self.decoder_dim, self.decoder_depth, self.decoder_heads) < 1:
            raise ValueError("in_chans, decoder_dim, decoder_depth and decoder_heads must be >= 1")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ValueError(
                f"decoder_dim {self.decoder_dim} must be divisible by decoder_heads {self.decoder_heads} and by 4"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.pos_embed not in _POS_EMBEDS:
            raise ValueError(f"pos_embed must be one of {_POS_EMBEDS}, got {self.pos_embed!r}")
        if not 0.0 <= self.border_threshold < 1.0:
            raise ValueError(f"border_threshold must be in [0, 1), got {self.border_threshold}")


@dataclass
class MAEOutput:
    """What one MAE forward returns.

    Attributes:
        loss: scalar float32, MSE over the scored patches of the valid images.
        loss_count: detached scalar, the number of those patches (``loss``'s denominator; for a mean over
            all ranks, ``radstream.train.steps.accumulate_step``).
        pred: ``[N, L, p*p*C]`` predicted patches (normalised per patch when norm_pix_loss).
        mask: ``[N, L]`` float, 1 = scored: hidden from the encoder and not background (MAE's mask when
            there is no background).
        hidden: ``[N, L]`` float, 1 = hidden from the encoder (background included).
        stats: detached 0-d tensors: ``background_frac`` (share of patches skipped as background),
            ``encoder_tokens`` (tokens per image in the encoder, CLS included, padding not),
            ``encoder_slots`` (the padded width, CLS included), ``scored_patches`` (per image).
    """

    loss: torch.Tensor
    loss_count: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    hidden: torch.Tensor
    stats: dict[str, torch.Tensor]


EVAL_SUMS = ("loss", "scored", "mse_masked", "hidden", "mse_foreground", "images")
"""What ``MAE.eval_sums`` adds up per batch, in order (see ``eval_means``)."""


class MAE(nn.Module):
    """MAE: timm ViT encoder on the visible patches, light transformer decoder over all patches."""

    def __init__(self, cfg: MAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = _create_encoder(cfg)
        self.patch_size = self.encoder.patch_embed.patch_size[0]
        dim = self.encoder.embed_dim
        # rows of the learned table before the patch rows (the CLS row, unless the model has none)
        self.num_pos_prefix = 0 if self.encoder.no_embed_class else 1
        if cfg.pos_embed == "sincos":
            self.encoder_pos = SinCosPosEmbed(dim)

        norm = partial(nn.LayerNorm, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, cfg.decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.decoder_dim))
        self.decoder_pos = SinCosPosEmbed(cfg.decoder_dim)
        self.decoder_blocks = nn.Sequential(
            *[
                Block(cfg.decoder_dim, cfg.decoder_heads, mlp_ratio=4.0, qkv_bias=True, norm_layer=norm)
                for _ in range(cfg.decoder_depth)
            ]
        )
        self.decoder_norm = norm(cfg.decoder_dim)
        self.decoder_pred = nn.Linear(cfg.decoder_dim, self.patch_size**2 * cfg.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        """The reference's init of the whole MAE: the patch embedding as a Linear over its flattened kernel,
        N(0, 0.02) CLS and mask tokens, then xavier-uniform Linears and unit LayerNorms everywhere."""
        weight = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(_init_mae_weights)

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        """The (h, w) patch grid of a batch [N, C, H, W]."""
        return grid_of(imgs, self.patch_size)

    def _embed_patches(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> patch tokens with positions [N, L, D], CLS token with its position [N, 1, D]."""
        enc = self.encoder
        grid_hw = self.grid(imgs)
        x = enc.patch_embed(imgs)  # [N, h, w, D] (dynamic_img_size: NHWC)
        x = x.reshape(x.shape[0], -1, x.shape[-1])  # [N, L, D]
        cls = enc.cls_token.expand(x.shape[0], -1, -1)
        if self.cfg.pos_embed == "sincos":
            x = x + self.encoder_pos(grid_hw, x.device).to(x.dtype)
        else:
            table = resample_learned(enc.pos_embed, enc.patch_embed.grid_size, grid_hw, self.num_pos_prefix)
            x = x + table[:, self.num_pos_prefix :].to(x.dtype)
            if self.num_pos_prefix:
                cls = cls + table[:, :1].to(cls.dtype)
        return x, cls

    def _encode(
        self, x: torch.Tensor, cls: torch.Tensor, attn_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x: [N, K, D] patch tokens, cls: [N, 1, D] -> [N, 1+K, D] normed encoder output, CLS first.

        ``attn_mask`` [N, 1, 1, 1+K] (``attention_mask``) keeps padding slots out of every block's attention.
        """
        enc = self.encoder
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        if attn_mask is None:
            x = enc.blocks(x)
        else:
            for block in enc.blocks:
                x = block(x, attn_mask=attn_mask)
        return enc.norm(x)

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        keep_bias: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> latent [N, 1+K, D] (rows padded to ``keep_width(L, r)``), mask [N, L]
        (1 = hidden), ids_restore [N, L]."""
        x, cls = self._embed_patches(imgs)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise=noise, keep_bias=keep_bias)
        # without keep_bias every image keeps exactly K patches: no padding, no mask (known without a sync)
        attn_mask = None if keep_bias is None else attention_mask(visible_counts(mask), x.shape[1])
        return self._encode(x, cls, attn_mask), mask, ids_restore

    def forward_decoder(
        self,
        latent: torch.Tensor,
        ids_restore: torch.Tensor,
        grid_hw: tuple[int, int],
        counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latent: [N, 1+K, D] -> pred [N, L, p*p*C]; ``counts`` [N]: the visible slots of each row (None: K)."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, length = ids_restore.shape
        width = x.shape[1] - 1
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length, -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, K+L, Dd]: visible slots, then mask tokens
        # the patch of shuffled rank r takes its visible slot r, or a mask token (padding slots: never)
        index = ids_restore if counts is None else ids_restore + width * (ids_restore >= counts[:, None])
        x_ = torch.gather(x_, dim=1, index=index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x_ = x_ + self.decoder_pos(grid_hw, x.device).to(x.dtype)
        x = torch.cat([x[:, :1], x_], dim=1)  # CLS back in front (it carries no position)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> the regression target [N, L, p*p*C] (per-patch normalised when norm_pix)."""
        target = patchify(imgs, self.patch_size)
        if self.cfg.norm_pix_loss:
            mean, std = patch_stats(target)
            target = (target - mean) / std
        return target

    def forward_loss(
        self, imgs: torch.Tensor, pred: torch.Tensor, scored: torch.Tensor, weight: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Mean patch MSE over the scored patches.

        Args:
            imgs: [N, C, H, W]. pred: [N, L, p*p*C]. scored: [N, L], 1 = scored.
            weight: [N] per image (None: 1); 0 (``valid`` False: the schedule's padding repeats) leaves an
                image out of the loss.
        """
        return masked_mean(patch_errors(pred, self.target(imgs)), scored, weight)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        background: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode, score.

        Args:
            imgs: [N, C, H, W] in [0, 1], H and W multiples of the patch size.
            mask_ratio: overrides the config's.
            background: [N, L] bool pure-background patches; when None and ``cfg.border_aware``, found with
                ``background_patches(imgs, p, cfg.border_threshold)``.
            noise: [N, L] masking noise (reproducible masks); uniform random when None.
            valid: [N] bool, False for a padding repeat (left out of the loss); None: all valid.
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        if background is None and self.cfg.border_aware:
            background = background_patches(imgs, self.patch_size, self.cfg.border_threshold)
        keep_bias = None
        if background is not None:
            keep_bias = torch.zeros(background.shape, device=imgs.device).masked_fill(background, math.inf)
        latent, hidden, ids_restore = self.forward_encoder(imgs, ratio, keep_bias, noise)
        counts = visible_counts(hidden)
        pred = self.forward_decoder(latent, ids_restore, self.grid(imgs), counts)
        scored = hidden if background is None else hidden * (~background).to(hidden.dtype)
        loss = self.forward_loss(imgs, pred, scored, valid)
        counted = scored.detach() if valid is None else scored.detach() * valid[:, None].to(scored.dtype)
        bg_frac = (
            background.float().mean() if background is not None else imgs.new_zeros((), dtype=torch.float)
        )
        stats = {
            "background_frac": bg_frac.detach(),
            "encoder_tokens": (counts.float() + 1).mean(),
            "encoder_slots": torch.full((), float(latent.shape[1]), device=imgs.device),
            "scored_patches": scored.detach().float().sum(dim=1).mean(),
        }
        return MAEOutput(
            loss=loss, loss_count=counted.sum(), pred=pred, mask=scored, hidden=hidden, stats=stats
        )

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> encoder tokens [N, 1+L, D] of all patches (no masking), CLS first."""
        x, cls = self._embed_patches(imgs)
        return self._encode(x, cls)

    def eval_sums(self, imgs: torch.Tensor, out: MAEOutput, valid: torch.Tensor) -> torch.Tensor:
        """Float64 [len(EVAL_SUMS)] sums of one batch's valid images, to add over a split (``eval_means``).

        ``loss``: the objective summed over scored patches; ``mse_masked``: pixel MSE over every hidden patch,
        background included (the study's test MSE); ``mse_foreground``: over the scored (hidden, foreground)
        patches. Both MSEs compare the prediction with the [0, 1] pixels; with norm_pix_loss the prediction
        is normalised and un-normalising it would need the hidden patch's own statistics, so they are 0.
        """
        weight = valid.float()
        per_patch = patch_errors(out.pred, self.target(imgs))
        scored, hidden = out.mask.float() * weight[:, None], out.hidden.float() * weight[:, None]
        sums = [(per_patch * scored).sum(), scored.sum()]
        pixel = per_patch if not self.cfg.norm_pix_loss else torch.zeros_like(per_patch)
        sums += [(pixel * hidden).sum(), hidden.sum(), (pixel * scored).sum(), weight.sum()]
        return torch.stack([s.detach().double() for s in sums])

    def eval_means(self, sums: torch.Tensor) -> dict[str, float | None]:
        """The split's means from summed ``eval_sums``: loss, mse_masked, mse_foreground (None with
        norm_pix_loss: no leak-free pixel MSE exists), images."""
        total = dict(zip(EVAL_SUMS, sums.tolist(), strict=True))
        pixel = not self.cfg.norm_pix_loss
        return {
            "loss": total["loss"] / max(total["scored"], 1.0),
            "mse_masked": total["mse_masked"] / max(total["hidden"], 1.0) if pixel else None,
            "mse_foreground": total["mse_foreground"] / max(total["scored"], 1.0) if pixel else None,
            "images": int(total["images"]),
        }

    def pred_pixels(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """pred: [N, L, p*p*C] -> predicted patches in pixel space, for display only: with norm_pix_loss it
        un-normalises with the target patch's own statistics (as MAE's visualisation), never for a metric."""
        if not self.cfg.norm_pix_loss:
            return pred
        mean, std = patch_stats(patchify(imgs, self.patch_size))
        return pred * std + mean

    def to_image(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels where ``mask`` is 1, the input elsewhere: [N, C, H, W] in pixel space."""
        patches = patchify(imgs, self.patch_size)
        mixed = torch.where(mask.bool()[..., None], self.pred_pixels(imgs, pred).to(patches.dtype), patches)
        return unpatchify(mixed, self.patch_size, self.grid(imgs))


def _init_mae_weights(module: nn.Module) -> None:
    """MAE's init: xavier-uniform linears, zero biases, unit layer norms."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _create_encoder(cfg: MAEConfig) -> nn.Module:
    """The timm ViT, random init, no head, any image size; positions per our config."""
    overrides = {k: v for k in ("embed_dim", "depth", "num_heads") if (v := getattr(cfg, k)) is not None}
    encoder = timm.create_model(
        cfg.encoder,
        pretrained=False,
        in_chans=cfg.in_chans,
        num_classes=0,
        global_pool="token",
        dynamic_img_size=True,
        pos_embed="learn" if cfg.pos_embed == "learned" else "",
        **overrides,
    )
    if getattr(encoder, "cls_token", None) is None or getattr(encoder, "reg_token", None) is not None:
        raise ValueError(f"encoder {cfg.encoder!r}: need a ViT with a CLS token and no register tokens")
    patch = encoder.patch_embed.patch_size
    if patch[0] != patch[1]:
        raise ValueError(f"encoder {cfg.encoder!r}: need square patches, got {patch}")
    return encoder


def build_mae(cfg: MAEConfig) -> MAE:
    """The MAE of ``cfg``, initialised from ``cfg.init`` when given."""
    model = MAE(cfg)
    if cfg.init is not None:
        load_init(model, cfg.init)
    return model
