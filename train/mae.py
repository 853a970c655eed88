"""Masked autoencoder (He et al., 2021) with a timm ViT encoder, for 1-channel images of any bin shape.

Written as the small named steps of facebookresearch/mae ``models_mae.py``: ``patchify``, ``random_masking``,
``forward_encoder``, ``forward_decoder``, ``forward_loss``. Shapes: ``N`` batch, ``C`` channels, ``p`` patch
size, ``(h, w)`` the patch grid of the batch's bin, ``L = h*w`` patches, ``D`` encoder width.

Any ``H × W`` that is a multiple of the patch size runs (non-square grids too): positional embeddings are made
per grid (fixed sin-cos, or timm's learned table resampled). Border-aware masking never shows pure-background
patches to the encoder and leaves them out of the loss.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import Block
from torch import nn

from train.pos_embed import SinCosPosEmbed, resample_learned
from train.weights import load_adapted, read_state_dict

logger = logging.getLogger(__name__)

_POS_EMBEDS = ("sincos", "learned")
_PIX_EPS = 1e-6  # norm_pix_loss: target = (x - mean) / sqrt(var + eps), as in MAE


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
        loss: scalar float32, MSE over the scored patches.
        pred: ``[N, L, p*p*C]`` predicted patches (normalised per patch when norm_pix_loss).
        mask: ``[N, L]`` float, 1 = scored: hidden from the encoder and not background (MAE's mask when
            there is no background).
        stats: detached 0-d tensors: ``background_frac`` (share of patches skipped as background),
            ``encoder_tokens`` (tokens per image in the encoder, CLS included), ``scored_patches`` (per image).
    """

    loss: torch.Tensor
    pred: torch.Tensor
    mask: torch.Tensor
    stats: dict[str, torch.Tensor]


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: [N, C, H, W] -> [N, L, p*p*C], patches row-major over the (H/p, W/p) grid."""
    n, c = imgs.shape[:2]
    h, w = _grid(imgs, p)
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def _grid(imgs: torch.Tensor, p: int) -> tuple[int, int]:
    """The (h, w) patch grid of [N, C, H, W] images; H and W must be multiples of p."""
    hh, ww = imgs.shape[-2:]
    if hh % p or ww % p:
        raise ValueError(f"image {hh}x{ww} is not a multiple of the patch size {p}")
    return hh // p, ww // p


def unpatchify(x: torch.Tensor, p: int, grid_hw: tuple[int, int]) -> torch.Tensor:
    """x: [N, L, p*p*C] -> [N, C, h*p, w*p] for the patch grid ``grid_hw = (h, w)``."""
    n, length, dim = x.shape
    h, w = grid_hw
    c = dim // (p * p)
    if h * w != length or c * p * p != dim:
        raise ValueError(f"cannot unpatchify [{n}, {length}, {dim}] to a {h}x{w} grid of {p}-pixel patches")
    x = x.reshape(n, h, w, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, h * p, w * p)


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    keep_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise.

    Args:
        x: [N, L, D] patch tokens.
        mask_ratio: share of the L patches to hide.
        noise: [N, L] sort keys (uniform by default); the smallest are kept.
        keep_bias: [N, L] added to the noise; ``+inf`` marks a patch that must never be visible (background).

    Returns:
        x_visible [N, len_keep, D], mask [N, L] (1 = hidden), ids_restore [N, L] (unshuffles decoder tokens).

    Without ``keep_bias``, ``len_keep = int(L * (1 - mask_ratio))``. With it (border-aware masking) the ratio
    applies to the foreground: ``len_keep = int(F * (1 - mask_ratio))`` where F is the largest number of
    keepable (finite-bias) patches in the batch, so the encoder skips the background's share of tokens — the
    compute saving. Tensors need one ``len_keep`` per batch, so it is also capped by the smallest keepable
    count: background is never visible. At least one patch is always kept (a fully background image then shows
    one background patch). The counts are read on the host (one sync).
    """
    n, length, dim = x.shape
    len_keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    if keep_bias is not None:
        keepable = torch.isfinite(keep_bias).sum(dim=1)
        len_keep = min(int(int(keepable.max()) * (1 - mask_ratio)), int(keepable.min()))
        noise = noise + keep_bias
    len_keep = max(len_keep, 1)

    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    x_visible = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, dim=1, index=ids_restore)  # back to patch order
    return x_visible, mask, ids_restore


def background_patches(
    imgs: torch.Tensor,
    p: int,
    threshold: float,
    boxes: torch.Tensor | Sequence[Sequence[int]] | None = None,
) -> torch.Tensor:
    """Pure-background patches.

    Args:
        imgs: [N, C, H, W] in [0, 1].
        p: patch size.
        threshold: a patch is background when all its pixels are <= this.
        boxes: optional [N, 4] foreground boxes ``(y0, x0, y1, x1)``, half-open, in pixel coordinates of the
            bin; patches entirely outside their image's box are background too.

    Returns:
        [N, L] bool, True = background.
    """
    background = patchify(imgs, p).amax(dim=-1) <= threshold
    if boxes is None:
        return background
    boxes = torch.as_tensor(boxes, device=imgs.device).reshape(-1, 4)
    h, w = imgs.shape[-2] // p, imgs.shape[-1] // p
    top = torch.arange(h, device=imgs.device) * p  # [h] first pixel row of each patch row
    left = torch.arange(w, device=imgs.device) * p
    y0, x0, y1, x1 = (boxes[:, i, None] for i in range(4))  # [N, 1] each
    rows_out = (top + p <= y0) | (top >= y1)  # [N, h]
    cols_out = (left + p <= x0) | (left >= x1)  # [N, w]
    outside = rows_out[:, :, None] | cols_out[:, None, :]  # [N, h, w]
    return background | outside.reshape(imgs.shape[0], h * w)


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
        self._init_decoder()

    def _init_decoder(self) -> None:
        nn.init.normal_(self.mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            module.apply(_init_mae_weights)

    def grid(self, imgs: torch.Tensor) -> tuple[int, int]:
        """The (h, w) patch grid of a batch [N, C, H, W]."""
        return _grid(imgs, self.patch_size)

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

    def _encode(self, x: torch.Tensor, cls: torch.Tensor) -> torch.Tensor:
        """x: [N, K, D] patch tokens, cls: [N, 1, D] -> [N, 1+K, D] normed encoder output, CLS first."""
        enc = self.encoder
        x = torch.cat([cls.to(x.dtype), x], dim=1)
        x = enc.norm_pre(enc.pos_drop(x))
        x = enc.blocks(x)
        return enc.norm(x)

    def forward_encoder(
        self,
        imgs: torch.Tensor,
        mask_ratio: float,
        keep_bias: torch.Tensor | None,
        noise: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [N, C, H, W] -> latent [N, 1+len_keep, D], mask [N, L] (1 = hidden), ids_restore [N, L]."""
        x, cls = self._embed_patches(imgs)
        x, mask, ids_restore = random_masking(x, mask_ratio, noise=noise, keep_bias=keep_bias)
        return self._encode(x, cls), mask, ids_restore

    def forward_decoder(
        self, latent: torch.Tensor, ids_restore: torch.Tensor, grid_hw: tuple[int, int]
    ) -> torch.Tensor:
        """latent: [N, 1+K, D] -> pred [N, L, p*p*C]."""
        x = self.decoder_embed(latent)  # [N, 1+K, Dd]
        n, length = ids_restore.shape
        mask_tokens = self.mask_token.to(x.dtype).expand(n, length + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [N, L, Dd], visible first
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))  # unshuffle
        x_ = x_ + self.decoder_pos(grid_hw, x.device).to(x.dtype)
        x = torch.cat([x[:, :1], x_], dim=1)  # CLS back in front (it carries no position)
        x = self.decoder_norm(self.decoder_blocks(x))
        return self.decoder_pred(x)[:, 1:]

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W], pred: [N, L, p*p*C], scored: [N, L] -> mean patch MSE over the scored patches."""
        target = patchify(imgs, self.patch_size)
        if self.cfg.norm_pix_loss:
            mean, std = _patch_stats(target)
            target = (target - mean) / std
        return _masked_mse(pred, target, scored)

    def forward(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        background: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> MAEOutput:
        """Mask, encode, decode, score.

        Args:
            imgs: [N, C, H, W] in [0, 1], H and W multiples of the patch size.
            mask_ratio: overrides the config's.
            background: [N, L] bool pure-background patches; when None and ``cfg.border_aware``, found with
                ``background_patches(imgs, p, cfg.border_threshold)``.
            noise: [N, L] masking noise (reproducible masks); uniform random when None.
        """
        ratio = self.cfg.mask_ratio if mask_ratio is None else mask_ratio
        if background is None and self.cfg.border_aware:
            background = background_patches(imgs, self.patch_size, self.cfg.border_threshold)
        keep_bias = None
        if background is not None:
            keep_bias = torch.zeros(background.shape, device=imgs.device).masked_fill(background, math.inf)
        latent, hidden, ids_restore = self.forward_encoder(imgs, ratio, keep_bias, noise)
        pred = self.forward_decoder(latent, ids_restore, self.grid(imgs))
        scored = hidden if background is None else hidden * (~background).to(hidden.dtype)
        loss = self.forward_loss(imgs, pred, scored)
        bg_frac = (
            background.float().mean() if background is not None else imgs.new_zeros((), dtype=torch.float)
        )
        stats = {
            "background_frac": bg_frac.detach(),
            "encoder_tokens": torch.full((), float(latent.shape[1]), device=imgs.device),
            "scored_patches": scored.detach().float().sum(dim=1).mean(),
        }
        return MAEOutput(loss=loss, pred=pred, mask=scored, stats=stats)

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> encoder tokens [N, 1+L, D] of all patches (no masking), CLS first."""
        x, cls = self._embed_patches(imgs)
        return self._encode(x, cls)

    def pred_pixels(self, imgs: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """pred: [N, L, p*p*C] -> predicted patches in pixel space (undoes norm_pix with the target's stats)."""
        if not self.cfg.norm_pix_loss:
            return pred
        mean, std = _patch_stats(patchify(imgs, self.patch_size))
        return pred * std + mean

    def pixel_mse(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """MSE in [0, 1] pixel space over the masked (scored) patches, never normalised: the study's test MSE.

        Args:
            imgs: [N, C, H, W] in [0, 1]. pred: [N, L, p*p*C] from ``forward``. mask: [N, L], 1 = scored.
        """
        return _masked_mse(self.pred_pixels(imgs, pred), patchify(imgs, self.patch_size), mask)

    def to_image(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Predicted pixels where ``mask`` is 1, the input elsewhere: [N, C, H, W] in pixel space."""
        patches = patchify(imgs, self.patch_size)
        mixed = torch.where(mask.bool()[..., None], self.pred_pixels(imgs, pred).to(patches.dtype), patches)
        return unpatchify(mixed, self.patch_size, self.grid(imgs))

    @torch.no_grad()
    def reconstruct(
        self,
        imgs: torch.Tensor,
        mask_ratio: float | None = None,
        background: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Image-space reconstruction [N, C, H, W] with the visible (and background) patches pasted back."""
        out = self(imgs, mask_ratio=mask_ratio, background=background, noise=noise)
        return self.to_image(imgs, out.pred, out.mask)


def _patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance + eps, as MAE's norm_pix_loss) of [N, L, P]."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + _PIX_EPS) ** 0.5


def _masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over patches with mask 1 of the per-patch MSE, reduced in float32 (0 when no patch is masked)."""
    per_patch = (pred.float() - target.float()).pow(2).mean(dim=-1)  # [N, L]
    mask = mask.float()
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)


def _init_mae_weights(module: nn.Module) -> None:
    """MAE's decoder init: xavier-uniform linears, zero biases, unit layer norms."""
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


def load_init(model: MAE, path: str | Path) -> tuple[list[str], list[str]]:
    """Initialise from a local checkpoint (never the network).

    An MAE checkpoint (a dict whose "model" state dict has ``encoder.`` keys) loads the whole model, strictly.
    Anything else is read as timm ViT weights for the encoder, fitted by ``train.weights.adapt_state`` (RGB
    patch-embedding weights summed over the input channels, the learned position table resampled to ours or
    dropped for sin-cos, the classifier head dropped); missing and unused keys are logged.

    Returns:
        (missing keys, unexpected keys).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    state = read_state_dict(path)
    if any(k.startswith("encoder.") for k in state):
        result = model.load_state_dict(state, strict=True)
        logger.info("loaded MAE checkpoint %s (encoder and decoder)", path)
        return list(result.missing_keys), list(result.unexpected_keys)
    missing, unexpected = load_adapted(model.encoder, state, Path(path))
    logger.info("loaded timm ViT weights %s into the encoder", path)
    return missing, unexpected
