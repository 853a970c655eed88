"""What a bin plan costs: tokens per image, aspect distortion, padding, cropping and unfillable bins."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from radstream.bucketing.geometry import FIT_MODES, Bin, as_sizes, fit_sizes


@dataclass(frozen=True)
class BinStats:
    """One row of the report: a bin shape and the images assigned to it."""

    name: str
    height: int
    width: int
    tokens: int
    """Tokens per image at this shape."""
    count: int
    """Images assigned to this bin."""


@dataclass(frozen=True)
class BinReport:
    """Summary of a bin plan over a set of source sizes (see :func:`plan_report`)."""

    mode: str
    patch_size: int
    num_images: int
    bins: tuple[BinStats, ...]
    mean_tokens: float
    """Mean tokens per image."""
    mean_distortion: float
    """Mean ``|log(aspect of the fitted content / source aspect)|``; only stretch distorts beyond rounding."""
    padding_fraction: float
    """pad: mean share of an image's bin pixels that are letterbox padding (0 for the other modes)."""
    cropped_fraction: float
    """crop: mean share of an image's (resized) source pixels cut away (0 for the other modes)."""
    batch_size: int | None = None
    """The global batch size the two counts below refer to, if one was given."""
    stranded_images: int | None = None
    """Images in bins with fewer than ``batch_size`` images: they can never fill a batch."""
    skipped_images: int | None = None
    """Images a drop-incomplete epoch skips: the remainder ``count % batch_size`` of every bin."""

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly dict."""
        out = dataclasses.asdict(self)
        out["bins"] = [dataclasses.asdict(b) for b in self.bins]
        return out

    def to_text(self) -> str:
        """A readable table of the bins followed by the overall figures."""
        total = max(self.num_images, 1)
        lines = [f"{'bin':>11} {'tokens':>7} {'images':>9} {'share':>7}"]
        for b in self.bins:
            lines.append(f"{b.name:>11} {b.tokens:>7} {b.count:>9} {100.0 * b.count / total:>6.1f}%")
        lines += [
            f"images: {self.num_images}, bins: {len(self.bins)}, fit: {self.mode}, patch: {self.patch_size}",
            f"mean tokens per image: {self.mean_tokens:.1f}",
            f"mean aspect distortion |dlog(h/w)|: {self.mean_distortion:.4f}",
            f"padding fraction: {self.padding_fraction:.4f}, cropped fraction: {self.cropped_fraction:.4f}",
        ]
        if self.batch_size is not None:
            lines.append(
                f"batch {self.batch_size}: {self.stranded_images} images in bins that never fill a batch; "
                f"a drop-incomplete epoch skips {self.skipped_images}"
            )
        return "\n".join(lines)


def _check_plan(sizes: np.ndarray, bins: Sequence[Bin], assignment: np.ndarray, mode: str) -> None:
    if len(assignment) != len(sizes):
        raise ValueError(f"{len(assignment)} assignments for {len(sizes)} sizes")
    if len(assignment) and (assignment.min() < 0 or assignment.max() >= len(bins)):
        raise ValueError(f"assignment indices must lie in [0, {len(bins)})")
    if mode not in FIT_MODES:
        raise ValueError(f"unknown fit mode {mode!r}; expected one of {FIT_MODES}")


def plan_report(
    sizes: np.ndarray,
    bins: Sequence[Bin],
    assignment: np.ndarray,
    patch_size: int,
    batch_size: int | None = None,
    mode: str = "stretch",
) -> BinReport:
    """Report on a bin plan and an assignment of sources to it.

    Args:
        sizes: ``[N, 2]`` source sizes.
        bins: the planned bins.
        assignment: ``[N]`` indices into ``bins``.
        patch_size: ViT patch size in pixels.
        batch_size: the global batch size (per-device batch x processes); adds the unfillable-bin counts.
        mode: the fit mode (see :data:`radstream.bucketing.geometry.FIT_MODES`).

    Raises:
        ValueError: mismatched lengths, an index outside ``bins``, or an unknown mode.
    """
    sizes = as_sizes(sizes)
    assignment = np.asarray(assignment, dtype=np.int64).reshape(-1)
    _check_plan(sizes, bins, assignment, mode)
    counts = np.bincount(assignment, minlength=len(bins))
    tokens = np.array([b.tokens(patch_size) for b in bins], dtype=np.int64)
    rows = tuple(
        BinStats(b.name, b.height, b.width, int(t), int(c))
        for b, t, c in zip(bins, tokens, counts, strict=True)
    )
    distortion, padding, cropped = _fit_costs(sizes, bins, assignment, mode)
    stranded = skipped = None
    if batch_size is not None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        stranded = int(counts[counts < batch_size].sum())
        skipped = int((counts % batch_size).sum())
    return BinReport(
        mode=mode,
        patch_size=patch_size,
        num_images=len(sizes),
        bins=rows,
        mean_tokens=float(tokens[assignment].mean()) if len(sizes) else 0.0,
        mean_distortion=distortion,
        padding_fraction=padding,
        cropped_fraction=cropped,
        batch_size=batch_size,
        stranded_images=stranded,
        skipped_images=skipped,
    )


def _fit_costs(
    sizes: np.ndarray, bins: Sequence[Bin], assignment: np.ndarray, mode: str
) -> tuple[float, ...]:
    """Mean aspect distortion, padding fraction and cropped fraction over all sources."""
    if len(sizes) == 0:
        return 0.0, 0.0, 0.0
    bin_hw = np.array([[b.height, b.width] for b in bins], dtype=np.int64)[assignment]
    h, w = sizes[:, 0], sizes[:, 1]
    rh, rw, _, _ = fit_sizes(h, w, bin_hw[:, 0], bin_hw[:, 1], mode)
    distortion = np.abs(np.log((rh / rw) / (h / w)))
    bin_pixels = bin_hw[:, 0] * bin_hw[:, 1]
    resized_pixels = rh * rw
    padding = (bin_pixels - resized_pixels) / bin_pixels if mode == "pad" else np.zeros(len(sizes))
    cropped = (resized_pixels - bin_pixels) / resized_pixels if mode == "crop" else np.zeros(len(sizes))
    return float(distortion.mean()), float(padding.mean()), float(cropped.mean())
