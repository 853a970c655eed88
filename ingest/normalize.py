"""Pixel value normalisation shared by every reader: luminance, min-max to [0, 1], foreground box.

Min-max normalisation is split in two so that callers can work on the stored numbers: :func:`minmax_bounds`
finds the two values that map to 0 and to 1, :func:`scale_to_unit` applies that linear map. Both also take
grayscale that is a linear function of the stored numbers (a DICOM rescale, a MONOCHROME1 inversion) without
that function ever being applied to the full image: the map to [0, 1] only depends on its sign.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from radstream.ingest.errors import RejectError

# ITU-R BT.601 luma weights, the ones Pillow's convert("L") uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


class Grayscale(NamedTuple):
    """Grayscale values of an image held as ``slope * values + intercept``.

    The linear map is kept unapplied: normalisation only needs its sign, and a full-size float copy of a
    large radiograph costs more than everything else the shard build does with it after decoding.
    """

    values: np.ndarray
    """``[H, W]`` stored numbers, any real dtype."""
    slope: float = 1.0
    """Grayscale per stored unit; negative for data where higher stored values are darker (MONOCHROME1)."""
    intercept: float = 0.0
    """Grayscale of a stored 0."""


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Luma of an RGB image ``[H, W, 3]`` (extra channels such as alpha are ignored) as float64 ``[H, W]``."""
    return rgb[..., :3].astype(np.float64) @ _LUMA_WEIGHTS


def minmax_bounds(
    arr: np.ndarray,
    percentile_low: float = 0.0,
    percentile_high: float = 100.0,
    *,
    slope: float = 1.0,
    intercept: float = 0.0,
) -> tuple[float, float]:
    """The values of ``arr`` that min-max normalisation of ``slope * arr + intercept`` maps to 0 and to 1.

    The bounds are the ``percentile_low`` and ``percentile_high`` percentiles of the grayscale (0 and 100:
    plain min and max, the study's normalisation). When a percentile clip would leave no range (say 99% of the
    pixels share one value) the plain min and max are used instead, so a clip never turns a real image into a
    flat one. The answer is in units of ``arr``: for a negative slope the value mapped to 0 is the larger one.

    Args:
        arr: stored pixel values, any real dtype, any shape.
        percentile_low: lower percentile in [0, 100).
        percentile_high: upper percentile in (percentile_low, 100].
        slope: grayscale per unit of ``arr``.
        intercept: grayscale of ``arr == 0``.

    Returns:
        ``(zero, one)``: give them to :func:`scale_to_unit`.

    Raises:
        RejectError: the image is empty or constant, or holds NaN or infinite values.
    """
    if arr.size == 0:
        raise RejectError("empty image (no pixels)")
    finite_map = math.isfinite(slope) and math.isfinite(intercept)
    if not finite_map or (arr.dtype.kind == "f" and not np.isfinite(arr).all()):
        raise RejectError("image holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo or slope == 0:
        raise RejectError(f"constant image (min == max == {slope * lo + intercept:g})")
    inverted = slope < 0
    if percentile_low > 0 or percentile_high < 100:
        # A decreasing map turns the grayscale's low percentile into the stored values' high one.
        qs = (100 - percentile_high, 100 - percentile_low) if inverted else (percentile_low, percentile_high)
        p_lo, p_hi = (float(p) for p in np.percentile(arr, qs))
        if p_hi > p_lo:
            lo, hi = p_lo, p_hi
    return (hi, lo) if inverted else (lo, hi)


def scale_to_unit(arr: np.ndarray, zero: float, one: float) -> np.ndarray:
    """Map ``arr`` linearly so that ``zero`` becomes 0 and ``one`` becomes 1, clipping outside [0, 1].

    ``zero > one`` inverts the image. Returns float32 of ``arr``'s shape.
    """
    # float32 holds every integer below 2**24 exactly, which covers all radiograph bit depths: the common case
    # then avoids float64 temporaries (half the memory traffic on the largest arrays of the build).
    exact32 = arr.dtype == np.float32 or (arr.dtype.kind in "iub" and max(abs(zero), abs(one)) < 2**24)
    work = np.float32 if exact32 else np.float64
    out = arr.astype(work)
    out -= work(zero)
    out /= work(one - zero)
    np.clip(out, 0.0, 1.0, out=out)
    return out if exact32 else out.astype(np.float32)


def _line_ranges(box: np.ndarray, axis: int, zero: float, one: float) -> np.ndarray:
    """Value range of every row (axis=1) or column (axis=0) of ``box`` after ``scale_to_unit``."""
    # The map is monotonic, so a line's range after it follows from the line's own min and max: two
    # reductions over the stored values instead of a full-size float image.
    ends = np.stack([box.min(axis=axis), box.max(axis=axis)]).astype(np.float64)
    ends -= zero
    ends /= one - zero
    np.clip(ends, 0.0, 1.0, out=ends)
    return np.abs(ends[1] - ends[0])


def _uniform_run(ranges: np.ndarray, tolerance: float) -> tuple[int, int]:
    """Lengths of the leading and trailing runs of ``ranges <= tolerance``."""
    uniform = ranges <= tolerance
    if uniform.all():
        return len(ranges), 0
    lead = int(np.argmin(uniform))
    trail = int(np.argmin(uniform[::-1]))
    return lead, trail


def _uniform_rows(rows: np.ndarray, zero: float, one: float, tolerance: float) -> int:
    """How many leading rows of ``rows`` are uniform: value range (normalised) at most ``tolerance``."""
    # Borders are thin, so rows are judged in growing blocks from the edge inward and the scan stops at the
    # first non-uniform one: a small part of the image is read instead of all of it.
    start, block = 0, 16
    while start < len(rows):
        busy = np.flatnonzero(_line_ranges(rows[start : start + block], 1, zero, one) > tolerance)
        if busy.size:
            return start + int(busy[0])
        start, block = start + block, block * 2
    return len(rows)


def foreground_box_of(
    values: np.ndarray, zero: float, one: float, tolerance: float = 0.02
) -> tuple[int, int, int, int]:
    """:func:`foreground_box` of ``scale_to_unit(values, zero, one)``, without computing that image."""
    height, width = values.shape
    y0, x0, y1, x1 = 0, 0, height, width
    while True:
        rows = values[y0:y1, x0:x1]
        top = _uniform_rows(rows, zero, one, tolerance)
        if top == y1 - y0:
            return 0, 0, height, width
        y0, y1 = y0 + top, y1 - _uniform_rows(rows[::-1], zero, one, tolerance)
        # Columns are judged all at once: a slab of a few columns costs a memory access per row, so scanning
        # slabs inward is slower than one streaming pass over the box.
        left, right = _uniform_run(_line_ranges(values[y0:y1, x0:x1], 0, zero, one), tolerance)
        if left == x1 - x0:
            return 0, 0, height, width
        x0, x1 = x0 + left, x1 - right
        if left == right == 0:
            # The rows were just judged on these same columns, so another pass would strip nothing.
            return y0, x0, y1, x1


def foreground_box(pixels01: np.ndarray, tolerance: float = 0.02) -> tuple[int, int, int, int]:
    """The image without its uniform borders (black collimation, white frames).

    Rows and columns are stripped from each edge, scanning inward, while their value range (max - min) is at
    most ``tolerance``. Rows and columns are judged within the current box and the scan repeats until nothing
    more is stripped, so an L-shaped border (black on the left, white on top) comes off too. Uniform lines inside
    the image are kept.

    Args:
        pixels01: ``[H, W]`` image normalised to [0, 1].
        tolerance: largest value range of a line still counted as uniform.

    Returns:
        ``(y0, x0, y1, x1)``, half-open, in ``pixels01``'s coordinates; the full image when stripping would
        leave nothing.
    """
    return foreground_box_of(pixels01, 0.0, 1.0, tolerance)
