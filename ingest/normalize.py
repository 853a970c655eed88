"""Pixel value normalisation shared by every reader: luminance, min-max to [0, 1], foreground box."""

from __future__ import annotations

import numpy as np

from ingest.errors import RejectError

# ITU-R BT.601 luma weights, the ones Pillow's convert("L") uses.
_LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])


def luminance(rgb: np.ndarray) -> np.ndarray:
    """Luma of an RGB image ``[H, W, 3]`` (extra channels such as alpha are ignored) as float64 ``[H, W]``."""
    return rgb[..., :3].astype(np.float64) @ _LUMA_WEIGHTS


def minmax_normalize(
    arr: np.ndarray, percentile_low: float = 0.0, percentile_high: float = 100.0
) -> np.ndarray:
    """Map ``arr`` linearly onto [0, 1]: its low bound to 0, its high bound to 1, values outside clipped.

    The bounds are the ``percentile_low`` and ``percentile_high`` percentiles of ``arr`` (0 and 100: plain
    min and max, the study's normalisation). When a percentile clip would leave no range (say 99% of the pixels
    share one value) the plain min and max are used instead, so a clip never turns a real image into a flat one.

    Args:
        arr: pixel values, any real dtype, any shape.
        percentile_low: lower percentile in [0, 100).
        percentile_high: upper percentile in (percentile_low, 100].

    Returns:
        float32 array of ``arr``'s shape with values in [0, 1].

    Raises:
        RejectError: the image is constant, or holds NaN or infinite values.
    """
    if arr.size == 0:
        raise RejectError("empty image (no pixels)")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise RejectError("image holds NaN or infinite values")
    lo, hi = float(arr.min()), float(arr.max())
    if hi == lo:
        raise RejectError(f"constant image (min == max == {lo:g})")
    if percentile_low > 0 or percentile_high < 100:
        p_lo, p_hi = (float(p) for p in np.percentile(arr, [percentile_low, percentile_high]))
        if p_hi > p_lo:
            lo, hi = p_lo, p_hi
    # float32 holds every integer below 2**24 exactly, which covers all radiograph bit depths: the common case
    # then avoids float64 temporaries (half the memory traffic on the largest arrays of the build).
    exact32 = arr.dtype == np.float32 or (arr.dtype.kind in "iub" and max(abs(lo), abs(hi)) < 2**24)
    work = np.float32 if exact32 else np.float64
    out = arr.astype(work)
    out -= work(lo)
    out /= work(hi - lo)
    np.clip(out, 0.0, 1.0, out=out)
    return out if exact32 else out.astype(np.float32)


def _uniform_run(ranges: np.ndarray, tolerance: float) -> tuple[int, int]:
    """Lengths of the leading and trailing runs of ``ranges <= tolerance``."""
    uniform = ranges <= tolerance
    if uniform.all():
        return len(ranges), 0
    lead = int(np.argmin(uniform))
    trail = int(np.argmin(uniform[::-1]))
    return lead, trail


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
    height, width = pixels01.shape
    y0, x0, y1, x1 = 0, 0, height, width
    while True:
        box = pixels01[y0:y1, x0:x1]
        top, bottom = _uniform_run(np.ptp(box, axis=1), tolerance)
        if top == y1 - y0:
            return 0, 0, height, width
        y0, y1 = y0 + top, y1 - bottom
        box = pixels01[y0:y1, x0:x1]
        left, right = _uniform_run(np.ptp(box, axis=0), tolerance)
        if left == x1 - x0:
            return 0, 0, height, width
        x0, x1 = x0 + left, x1 - right
        if left == right == 0:
            # The rows were just judged on these same columns, so another pass would strip nothing.
            return y0, x0, y1, x1
