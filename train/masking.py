"""The MAE's patch and mask math, as pure tensor functions: patchify, per-image random masking (border-aware
too), the attention mask of a padded batch of visible tokens, background patches, and masked patch errors.

Shapes: ``N`` batch, ``C`` channels, ``p`` patch size, ``(h, w)`` the patch grid, ``L = h*w`` patches, ``D``
token width, ``K = keep_width(L, r)`` the widest visible set any image of the grid can have.

No function here reads a tensor's value on the host: every shape follows from the input shapes and the mask
ratio, so a compiled MAE step has one graph per bin shape, static, without a graph break or a device sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

PIX_EPS = 1e-6
"""norm_pix_loss: target = (x - mean) / sqrt(var + eps), as in MAE."""


def patchify(imgs: torch.Tensor, p: int) -> torch.Tensor:
    """imgs: [N, C, H, W] -> [N, L, p*p*C], patches row-major over the (H/p, W/p) grid."""
    n, c = imgs.shape[:2]
    h, w = grid_of(imgs, p)
    x = imgs.reshape(n, c, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, h * w, p * p * c)


def grid_of(imgs: torch.Tensor, p: int) -> tuple[int, int]:
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


def keep_width(length: int, mask_ratio: float) -> int:
    """K: the visible slots of a grid of ``length`` patches, ``max(1, int(L * (1 - r)))``.

    No image keeps more (an image keeps ``int(F * (1 - r))`` of its ``F <= L`` keepable patches), so rows
    padded to K fit every batch of the bin. Padding to the batch's own widest row instead would need that
    value on the host (a device sync and, under ``torch.compile``, a graph break and a new graph per length).
    """
    return max(1, int(length * (1 - mask_ratio)))


def random_masking(
    x: torch.Tensor,
    mask_ratio: float,
    noise: torch.Tensor | None = None,
    keep_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise, at the mask ratio of every image.

    Args:
        x: [N, L, D] patch tokens.
        mask_ratio: share of each image's keepable patches to hide.
        noise: [N, L] sort keys (uniform by default); the smallest are kept.
        keep_bias: [N, L] added to the noise; ``+inf`` marks a patch that must never be visible (background).

    Returns:
        x_visible [N, K, D], mask [N, L] (1 = hidden), ids_restore [N, L] (unshuffles decoder tokens).

    Image i keeps ``max(1, int(F_i * (1 - mask_ratio)))`` patches, F_i being its keepable (finite-bias)
    patches, L without ``keep_bias``: the standard MAE. Its visible patches fill the first slots of its row of
    ``x_visible``; the row is padded to ``K = keep_width(L, mask_ratio)`` (the grid's largest keep count,
    not the batch's: a static shape) with hidden patches, which ``attention_mask`` keeps out of attention
    (``visible_counts`` reads each row's length from ``mask``). Only an image with no keepable patch shows one
    background patch. Nothing is read back to the host.
    """
    n, length, dim = x.shape
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    keepable = torch.full((n,), length, device=x.device)
    if keep_bias is not None:
        keepable = torch.isfinite(keep_bias).sum(dim=1)
        noise = noise + keep_bias
    # float64 and truncation: the same count as Python's int(F * (1 - r))
    len_keep = (keepable.double() * (1 - mask_ratio)).long().clamp_min(1)  # [N]
    widest = keep_width(length, mask_ratio)  # >= every len_keep: keepable <= length

    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep, large is remove
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :widest]
    x_visible = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))

    rank = torch.arange(length, device=x.device)
    mask = (rank[None, :] >= len_keep[:, None]).to(x.dtype)  # in shuffled order
    mask = torch.gather(mask, dim=1, index=ids_restore)  # back to patch order
    return x_visible, mask, ids_restore


def visible_counts(mask: torch.Tensor) -> torch.Tensor:
    """mask: [N, L] (1 = hidden) -> [N] int64 visible patches per image."""
    return (mask == 0).sum(dim=1)


def attention_mask(counts: torch.Tensor, width: int) -> torch.Tensor:
    """Key-padding mask [N, 1, 1, 1+width] bool (True = attend) for CLS + padded visible tokens.

    Always a mask, even when no row happens to be padded: asking would read ``counts`` on the host. Callers
    that know statically that no row is padded (masking without ``keep_bias``) pass no mask at all.
    Boolean, not additive: it stays valid whatever dtype autocast gives the attention.

    Args:
        counts: [N] visible patches per image (``visible_counts``).
        width: K, the padded number of visible slots.
    """
    slots = torch.arange(width, device=counts.device)
    attend = slots[None, :] < counts[:, None]  # [N, K]
    attend = torch.cat([torch.ones_like(attend[:, :1]), attend], dim=1)  # CLS always attends
    return attend[:, None, None, :]


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


def patch_stats(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch mean and std (unbiased variance + eps, as MAE's norm_pix_loss) of [N, L, P]."""
    return patches.mean(dim=-1, keepdim=True), (patches.var(dim=-1, keepdim=True) + PIX_EPS) ** 0.5


def patch_errors(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """[N, L, P] pair -> [N, L] float32 per-patch mean squared error."""
    return (pred.float() - target.float()).pow(2).mean(dim=-1)


def masked_mean(
    per_patch: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean of ``per_patch [N, L]`` over the patches with ``mask [N, L]`` 1, each image weighted by ``weight
    [N]`` (None: 1; 0 leaves a padding repeat out); 0 when nothing is selected."""
    mask = mask.float()
    if weight is not None:
        mask = mask * weight.float()[:, None]
    return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)
