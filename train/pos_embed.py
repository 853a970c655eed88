"""Positional embeddings for patch grids of any shape.

Two kinds, both per grid so one model serves every bin shape:

- fixed 2-D sin-cos (as in the MAE paper), computed for a ``(rows, cols)`` grid and cached per grid and device;
- timm's learned table, resampled (bicubic) from its native grid to the grid of the batch.

The sin-cos layout follows facebookresearch/mae ``get_2d_sincos_pos_embed``: the first half of the channels
encodes the column (x), the second half the row (y), so a square grid gives the same numbers as MAE's tables.
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from torch import nn


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """1-D sin-cos embedding of positions.

    Args:
        embed_dim: output channels, even.
        positions: ``[M]`` positions (any float).

    Returns:
        ``[M, embed_dim]`` float32: ``sin`` in the first half, ``cos`` in the second.
    """
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dimension, got {embed_dim}")
    omega = torch.arange(embed_dim // 2, dtype=torch.float64, device=positions.device) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega  # [D/2]
    out = positions.to(torch.float64)[:, None] * omega[None, :]  # [M, D/2]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).to(torch.float32)


def sincos_2d(
    embed_dim: int, grid_hw: tuple[int, int], cls_token: bool = False, device: torch.device | None = None
) -> torch.Tensor:
    """2-D sin-cos embedding of a ``rows × cols`` patch grid.

    Args:
        embed_dim: output channels, a multiple of 4.
        grid_hw: ``(rows, cols)`` of the patch grid; need not be square.
        cls_token: prepend an all-zero row for the CLS token.
        device: where to build it.

    Returns:
        ``[rows*cols (+1), embed_dim]`` float32, row-major over the grid (the order of ``patchify``).
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a dimension divisible by 4, got {embed_dim}")
    rows, cols = grid_hw
    ys = torch.arange(rows, dtype=torch.float32, device=device)
    xs = torch.arange(cols, dtype=torch.float32, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")  # [rows, cols] each
    emb = torch.cat(
        [sincos_1d(embed_dim // 2, grid_x.reshape(-1)), sincos_1d(embed_dim // 2, grid_y.reshape(-1))], dim=1
    )
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb


class SinCosPosEmbed(nn.Module):
    """Fixed 2-D sin-cos embedding for whatever grid the batch has, cached per (grid, device).

    Under ``torch.compile`` the table is built inside the graph instead (no cache mutation while tracing);
    the compiler folds it into a constant per grid shape.
    """

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        if embed_dim % 4:
            raise ValueError(f"sin-cos position embedding needs a dimension divisible by 4, got {embed_dim}")
        self.embed_dim = embed_dim
        self._cache: dict[tuple[int, int, str], torch.Tensor] = {}

    def forward(self, grid_hw: tuple[int, int], device: torch.device) -> torch.Tensor:
        """Patch-token embedding ``[1, rows*cols, D]`` float32 (no CLS row: the CLS token gets none)."""
        if torch.compiler.is_compiling():
            return sincos_2d(self.embed_dim, grid_hw, device=device)[None]
        key = (int(grid_hw[0]), int(grid_hw[1]), str(device))
        table = self._cache.get(key)
        if table is None:
            table = sincos_2d(self.embed_dim, grid_hw, device=device)[None]
            self._cache[key] = table
        return table


def resample_learned(
    table: torch.Tensor, native_hw: tuple[int, int], grid_hw: tuple[int, int], num_prefix_tokens: int
) -> torch.Tensor:
    """timm's learned table ``[1, prefix + h0*w0, D]`` resampled to ``grid_hw`` (bicubic, antialiased).

    Gradients flow back into the table; the table is returned as it is when the grid is its native one.
    """
    return resample_abs_pos_embed(
        table, new_size=list(grid_hw), old_size=list(native_hw), num_prefix_tokens=num_prefix_tokens
    )
