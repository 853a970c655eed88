"""Reconstruction grids: one row per image, original | masked | reconstruction, written as PNG.

Images of different bins have different shapes; rows are left-aligned on a canvas as wide as the widest row.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from radstream.core.atomic import write_with
from radstream.train.mae import patchify, unpatchify

MASK_FILL = 0.5
"""Gray shown in place of the patches hidden from the encoder (radiograph background is black)."""
GAP = 4
"""Pixels between the panels and between the rows."""
CANVAS = 1.0
"""Canvas value around the panels (white, so black borders of the images stay visible)."""


def masked_images(
    imgs: torch.Tensor, mask: torch.Tensor, patch: int, fill: float = MASK_FILL
) -> torch.Tensor:
    """imgs [N, C, H, W], mask [N, L] (1 = hidden) -> the images with hidden patches set to ``fill``."""
    patches = patchify(imgs, patch)
    hidden = torch.where(mask.bool()[..., None], torch.full_like(patches, fill), patches)
    return unpatchify(hidden, patch, (imgs.shape[-2] // patch, imgs.shape[-1] // patch))


def reconstruction_grid(rows: Sequence[Sequence[torch.Tensor | np.ndarray]], gap: int = GAP) -> np.ndarray:
    """Panels in [0, 1] ([H, W] or [1, H, W]) arranged as rows of a grid -> uint8 [H_total, W_total].

    Args:
        rows: one sequence of panels per row (e.g. original, masked, reconstruction); panels in a row
            share a height.
        gap: canvas pixels between panels and rows.

    Raises:
        ValueError: no rows, or panels of one row with different heights.
    """
    if not rows:
        raise ValueError("a reconstruction grid needs at least one row")
    strips = [_row_strip([_as_2d(p) for p in row], gap) for row in rows]
    width = max(s.shape[1] for s in strips) + 2 * gap
    height = sum(s.shape[0] for s in strips) + gap * (len(strips) + 1)
    canvas = np.full((height, width), CANVAS, dtype=np.float32)
    top = gap
    for strip in strips:
        canvas[top : top + strip.shape[0], gap : gap + strip.shape[1]] = strip
        top += strip.shape[0] + gap
    return np.round(np.clip(canvas, 0.0, 1.0) * 255).astype(np.uint8)


def _as_2d(panel: torch.Tensor | np.ndarray) -> np.ndarray:
    """A panel as float32 [H, W]."""
    if isinstance(panel, torch.Tensor):
        panel = panel.detach().float().cpu().numpy()
    panel = np.asarray(panel, dtype=np.float32)
    if panel.ndim == 3 and panel.shape[0] == 1:
        panel = panel[0]
    if panel.ndim != 2:
        raise ValueError(f"a grid panel must be [H, W] or [1, H, W], got shape {panel.shape}")
    return panel


def _row_strip(panels: list[np.ndarray], gap: int) -> np.ndarray:
    """Panels side by side with ``gap`` canvas columns between them."""
    heights = {p.shape[0] for p in panels}
    if len(heights) != 1:
        raise ValueError(f"panels of one row must share a height, got {sorted(heights)}")
    spacer = np.full((panels[0].shape[0], gap), CANVAS, dtype=np.float32)
    parts = [part for p in panels for part in (p, spacer)][:-1]
    return np.concatenate(parts, axis=1)


def save_png(path: str | os.PathLike[str], image: np.ndarray) -> Path:
    """Write a uint8 [H, W] image as PNG, atomically (temp file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_with(path, lambda f: Image.fromarray(image).save(f, format="PNG"))
    return path


def save_reconstruction_grid(
    path: str | os.PathLike[str], samples: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
) -> Path:
    """Write ``samples`` of (original, masked, reconstruction) as a PNG grid, one row per sample."""
    return save_png(path, reconstruction_grid(samples))
