"""Bin planning and assignment: which few shapes to train on, and which shape each image gets.

Strategies (every shape a multiple of the patch size):

- ``fixed``: one shape for everything (the study: 224x224).
- ``strict`` (VariViT): every distinct source shape is its own bin, after capping its token count.
- ``smart``: K shapes planned from the size distribution (or given by the user); every image goes to the
  closest shape by aspect ratio and scale.

Sizes are always ``(height, width)`` pairs in source pixels, as an integer array of shape ``[N, 2]``.
Fitting an image into its bin (stretch / pad / crop) lives in :mod:`radstream.bucketing.geometry`; the planning report
in :mod:`radstream.bucketing.report`. Both are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from radstream.bucketing.geometry import (
    FIT_MODES,
    Bin,
    FitGeometry,
    as_sizes,
    fit_geometry,
    fit_sizes,
    parse_bins,
)
from radstream.bucketing.report import BinReport, BinStats, plan_report

__all__ = [
    "FIT_MODES",
    "STRATEGIES",
    "Bin",
    "BinReport",
    "BinStats",
    "BinningConfig",
    "FitGeometry",
    "assign_bins",
    "assign_strict",
    "assign_with_config",
    "capped_shapes",
    "fit_geometry",
    "fit_sizes",
    "parse_bins",
    "plan_bins",
    "plan_fixed",
    "plan_report",
    "plan_smart",
    "plan_strict",
]

STRATEGIES = ("fixed", "strict", "smart")

_ASSIGN_CHUNK_ROWS = 1 << 16


def capped_shapes(sizes: np.ndarray, patch_size: int, max_tokens: int) -> np.ndarray:
    """The strict-binning shape of each source, in patches: ``[N, 2]`` int64 ``(rows, cols)``.

    Each source is scaled down (aspect kept, never up) just enough that its area is at most ``max_tokens``
    patches, then floored to whole patches with at least one patch per side. When that floor of one patch
    makes a very elongated image exceed the budget, its long side is shortened until it fits, so the result
    always has at most ``max_tokens`` tokens.
    """
    sizes = as_sizes(sizes).astype(np.float64)
    h, w = sizes[:, 0], sizes[:, 1]
    scale = np.minimum(1.0, np.sqrt(max_tokens * float(patch_size) ** 2 / (h * w)))
    # The tiny epsilon keeps exact multiples (224 * 1.0 / 16) from flooring to one patch less.
    rows = np.maximum(np.floor(h * scale / patch_size + 1e-9).astype(np.int64), 1)
    cols = np.maximum(np.floor(w * scale / patch_size + 1e-9).astype(np.int64), 1)
    return _shorten_long_side(rows, cols, max_tokens)


def _shorten_long_side(rows: np.ndarray, cols: np.ndarray, max_tokens: int) -> np.ndarray:
    """Shorten the longer side where ``rows * cols > max_tokens`` (only possible after a 1-patch floor)."""
    long_side, short_side = np.maximum(rows, cols), np.minimum(rows, cols)
    long_side = np.minimum(long_side, max_tokens // short_side)
    tall = rows >= cols
    return np.stack([np.where(tall, long_side, short_side), np.where(tall, short_side, long_side)], axis=1)


def plan_fixed(shape: tuple[int, int] | str = (224, 224), patch_size: int = 16) -> list[Bin]:
    """One bin for every image (the study's 224x224)."""
    b = Bin.parse(shape) if isinstance(shape, str) else Bin(int(shape[0]), int(shape[1]))
    b.tokens(patch_size)
    return [b]


def plan_strict(sizes: np.ndarray, patch_size: int = 16, max_tokens: int = 196) -> list[Bin]:
    """VariViT binning: one bin per distinct source shape, capped to ``max_tokens`` (see :func:`capped_shapes`).

    Sources whose capped shapes coincide share a bin, so the result is sorted and free of duplicates.
    """
    unique = np.unique(as_sizes(sizes), axis=0)
    patches = np.unique(capped_shapes(unique, patch_size, max_tokens), axis=0)
    return [Bin(int(r) * patch_size, int(c) * patch_size) for r, c in patches]


def plan_smart(
    sizes: np.ndarray, num_bins: int = 4, patch_size: int = 16, max_tokens: int = 196, seed: int = 0
) -> list[Bin]:
    """Plan up to ``num_bins`` shapes from the size distribution.

    The log aspect ratios are clustered with a deterministic 1-D k-means (weighted by how many images share
    an aspect ratio, initialised at the weighted quantiles). Each cluster becomes a shape with the cluster's
    geometric-mean aspect ratio and an area of ``min(max_tokens, median source area in tokens)``, rounded to
    whole patches without exceeding ``max_tokens``. Shapes that coincide are merged; the result is sorted.

    Args:
        sizes: ``[N, 2]`` source sizes.
        num_bins: the number of clusters (fewer shapes come back when the data has fewer distinct aspects).
        patch_size: ViT patch size in pixels.
        max_tokens: the token budget per image.
        seed: seeds the re-placement of a cluster that runs empty; the plan is a pure function of its inputs.

    Raises:
        ValueError: no sizes, or a non-positive parameter.
    """
    sizes = as_sizes(sizes)
    if len(sizes) == 0:
        raise ValueError("cannot plan bins from an empty size list")
    if num_bins < 1 or patch_size < 1 or max_tokens < 1:
        raise ValueError("num_bins, patch_size and max_tokens must be positive")
    log_aspect = np.log(sizes[:, 0] / sizes[:, 1])
    values, inverse, counts = np.unique(log_aspect, return_inverse=True, return_counts=True)
    centres = _weighted_kmeans_1d(values, counts.astype(np.float64), num_bins, seed)
    labels = _nearest_sorted(centres, values)[inverse.reshape(-1)]
    area_tokens = sizes[:, 0] * sizes[:, 1] / float(patch_size) ** 2
    shapes = set()
    for k, centre in enumerate(centres):
        members = labels == k
        if members.any():
            target = min(float(max_tokens), float(np.median(area_tokens[members])))
            rows, cols = _patch_grid_shape(float(np.exp(centre)), target, max_tokens)
            shapes.add(Bin(rows * patch_size, cols * patch_size))
    return sorted(shapes)


def _nearest_sorted(centres: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Index of the nearest of the sorted ``centres`` for each value of ``x`` (ties go to the lower)."""
    return np.searchsorted((centres[1:] + centres[:-1]) / 2.0, x, side="left")


def _weighted_kmeans_1d(
    x: np.ndarray, weights: np.ndarray, k: int, seed: int, iters: int = 100
) -> np.ndarray:
    """Lloyd's k-means on sorted unique values with weights; returns sorted centres (some may be unused)."""
    rng = np.random.default_rng(seed)
    cum = np.cumsum(weights) / weights.sum()
    centres = x[np.minimum(np.searchsorted(cum, (np.arange(k) + 0.5) / k), len(x) - 1)].astype(np.float64)
    for _ in range(iters):
        centres.sort()
        labels = _nearest_sorted(centres, x)
        mass = np.bincount(labels, weights=weights, minlength=k)
        sums = np.bincount(labels, weights=weights * x, minlength=k)
        new = np.where(mass > 0, sums / np.maximum(mass, 1e-300), centres)
        empty = np.flatnonzero(mass == 0)
        if len(empty):
            # Re-place empty clusters k-means++-style at values far from every centre, if any are left.
            dist2 = weights * np.min((x[:, None] - new[None, :]) ** 2, axis=1)
            if dist2.sum() > 0:
                new[empty] = x[rng.choice(len(x), size=len(empty), p=dist2 / dist2.sum())]
        if np.allclose(np.sort(new), centres, rtol=0.0, atol=1e-12):
            return np.sort(new)
        centres = new
    return np.sort(centres)


def _patch_grid_shape(aspect: float, target_tokens: float, max_tokens: int) -> tuple[int, int]:
    """Whole-patch ``(rows, cols)`` closest to ``aspect`` (rows/cols) and ``target_tokens``, within budget."""
    rows_f, cols_f = np.sqrt(target_tokens * aspect), np.sqrt(target_tokens / aspect)
    rows = np.maximum(np.array([np.floor(rows_f), np.floor(rows_f), np.ceil(rows_f), np.ceil(rows_f)]), 1)
    cols = np.maximum(np.array([np.floor(cols_f), np.ceil(cols_f), np.floor(cols_f), np.ceil(cols_f)]), 1)
    grid = _shorten_long_side(rows.astype(np.int64), cols.astype(np.int64), max_tokens)
    cost = np.abs(np.log(grid[:, 0] / grid[:, 1]) - np.log(aspect)) + np.abs(
        np.log(grid[:, 0] * grid[:, 1] / target_tokens)
    )
    best = grid[int(np.argmin(cost))]
    return int(best[0]), int(best[1])


def assign_bins(
    sizes: np.ndarray,
    bins: Sequence[Bin],
    scale_weight: float = 0.25,
    *,
    patch_size: int = 16,
    max_tokens: int | None = None,
) -> np.ndarray:
    """The closest bin for each source: ``argmin |Δ log aspect| + scale_weight · |Δ log scale|``.

    Scale is the square root of the area. A source's area is first capped at ``max_tokens`` patches (the
    largest bin's area when ``max_tokens`` is None), so sources larger than every bin are judged as the
    largest size they would ever be trained at. Ties go to the bin listed first.

    Returns:
        ``[N]`` int64 indices into ``bins``.
    """
    sizes = as_sizes(sizes).astype(np.float64)
    if not bins:
        raise ValueError("no bins to assign to")
    bin_hw = np.array([[b.height, b.width] for b in bins], dtype=np.float64)
    bin_area = bin_hw[:, 0] * bin_hw[:, 1]
    cap = float(bin_area.max()) if max_tokens is None else float(max_tokens) * patch_size**2
    bin_aspect, bin_scale = np.log(bin_hw[:, 0] / bin_hw[:, 1]), 0.5 * np.log(bin_area)
    aspect = np.log(sizes[:, 0] / sizes[:, 1])
    scale = 0.5 * np.log(np.minimum(sizes[:, 0] * sizes[:, 1], cap))
    out = np.empty(len(sizes), dtype=np.int64)
    for start in range(0, len(sizes), _ASSIGN_CHUNK_ROWS):
        part = slice(start, start + _ASSIGN_CHUNK_ROWS)
        cost = np.abs(aspect[part, None] - bin_aspect[None, :])
        cost += scale_weight * np.abs(scale[part, None] - bin_scale[None, :])
        out[part] = np.argmin(cost, axis=1)
    return out


def assign_strict(
    sizes: np.ndarray,
    bins: Sequence[Bin],
    patch_size: int = 16,
    max_tokens: int = 196,
    scale_weight: float = 0.25,
) -> np.ndarray:
    """Strict assignment: each source goes to the bin of its own capped shape (see :func:`capped_shapes`).

    A source whose capped shape is not among ``bins`` (e.g. a validation image when the plan came from the
    training set) falls back to the closest bin as in :func:`assign_bins`.
    """
    sizes = as_sizes(sizes)
    if not bins:
        raise ValueError("no bins to assign to")
    patches = capped_shapes(sizes, patch_size, max_tokens) * patch_size
    width_span = max(int(patches[:, 1].max(initial=0)), max(b.width for b in bins)) + 1
    codes = patches[:, 0] * width_span + patches[:, 1]
    bin_codes = np.array([b.height * width_span + b.width for b in bins], dtype=np.int64)
    order = np.argsort(bin_codes, kind="stable")
    pos = np.minimum(np.searchsorted(bin_codes[order], codes), len(bins) - 1)
    out = order[pos]
    missing = bin_codes[out] != codes
    if missing.any():
        out[missing] = assign_bins(
            sizes[missing], bins, scale_weight, patch_size=patch_size, max_tokens=max_tokens
        )
    return out


@dataclass(frozen=True)
class BinningConfig:
    """How images are grouped into bin shapes (embedded in the shard builder's config)."""

    strategy: str = "smart"
    """``fixed`` (one shape), ``strict`` (one bin per capped source shape, VariViT) or ``smart`` (K shapes)."""
    num_bins: int = 4
    """smart: how many shapes to plan from the size distribution (ignored when ``bins`` is given)."""
    patch_size: int = 16
    """ViT patch size in pixels; every bin side is a multiple of it."""
    max_tokens: int = 196
    """Token budget per image for planned shapes (strict, smart); 196 = 224x224 at patch 16."""
    shape: str = "224x224"
    """fixed: the one shape, ``HxW``."""
    bins: str | None = None
    """smart: user-given shapes ``"HxW,HxW,..."`` instead of planning them (taken as given, not capped)."""
    fit: str = "stretch"
    """How an image is fitted into its bin: ``stretch``, ``pad`` (letterbox) or ``crop`` (centre crop)."""
    scale_weight: float = 0.25
    """Weight of the log-scale difference against the log-aspect difference when choosing a bin."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"binning.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.fit not in FIT_MODES:
            raise ValueError(f"binning.fit must be one of {FIT_MODES}, got {self.fit!r}")
        for name in ("num_bins", "patch_size", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"binning.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.scale_weight < 0:
            raise ValueError(f"binning.scale_weight must be ≥ 0, got {self.scale_weight}")
        plan_fixed(self.shape, self.patch_size)
        if self.bins is not None:
            parse_bins(self.bins, self.patch_size)


def plan_bins(cfg: BinningConfig, sizes: np.ndarray) -> list[Bin]:
    """The bins for ``cfg.strategy`` (sizes are ignored by ``fixed`` and by user-given smart shapes)."""
    if cfg.strategy == "fixed":
        return plan_fixed(cfg.shape, cfg.patch_size)
    if cfg.strategy == "strict":
        return plan_strict(sizes, cfg.patch_size, cfg.max_tokens)
    if cfg.bins is not None:
        return parse_bins(cfg.bins, cfg.patch_size)
    return plan_smart(sizes, cfg.num_bins, cfg.patch_size, cfg.max_tokens)


def assign_with_config(cfg: BinningConfig, sizes: np.ndarray, bins: Sequence[Bin]) -> np.ndarray:
    """Assign sources to ``bins`` the way ``cfg.strategy`` means it: strict by own shape, else closest."""
    if cfg.strategy == "strict":
        return assign_strict(sizes, bins, cfg.patch_size, cfg.max_tokens, cfg.scale_weight)
    return assign_bins(sizes, bins, cfg.scale_weight, patch_size=cfg.patch_size, max_tokens=cfg.max_tokens)
