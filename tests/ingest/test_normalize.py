"""Min-max normalisation, luminance and the foreground box."""

from __future__ import annotations

import numpy as np
import pytest

from radstream.ingest.errors import RejectError
from radstream.ingest.normalize import (
    foreground_box,
    foreground_box_of,
    luminance,
    minmax_bounds,
    scale_to_unit,
)


def minmax_normalize(arr: np.ndarray, low: float = 0.0, high: float = 100.0) -> np.ndarray:
    """The build's normalisation of an image: its bounds, then the linear map onto [0, 1]."""
    return scale_to_unit(arr, *minmax_bounds(arr, low, high))


def test_minmax_maps_min_to_0_and_max_to_1_linearly():
    arr = np.array([[100, 150], [200, 300]], dtype=np.uint16)
    out = minmax_normalize(arr)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.0, 0.25], [0.5, 1.0]], atol=1e-7)


def test_minmax_keeps_precision_of_large_integers():
    base = 2**30
    arr = np.array([base, base + 1, base + 2], dtype=np.int64)
    np.testing.assert_allclose(minmax_normalize(arr), [0.0, 0.5, 1.0], atol=1e-7)


def test_percentile_clip_saturates_outliers():
    arr = np.arange(1000, dtype=np.float64)
    arr[0] = -1e6  # a dead pixel
    arr[-1] = 1e6  # a hot pixel
    out = minmax_normalize(arr, 1.0, 99.0)
    lo, hi = np.percentile(arr, [1.0, 99.0])
    assert out[0] == 0.0 and out[-1] == 1.0
    np.testing.assert_allclose(out[500], (500 - lo) / (hi - lo), atol=1e-6)
    # Without the clip the two outliers squash the ramp into the middle.
    assert abs(minmax_normalize(arr)[10] - minmax_normalize(arr)[990]) < 0.001


def test_percentile_clip_that_would_flatten_falls_back_to_minmax():
    arr = np.zeros(1000)
    arr[:3] = [1.0, 2.0, 4.0]
    out = minmax_normalize(arr, 1.0, 99.0)  # both percentiles are 0
    np.testing.assert_allclose(out[:4], [0.25, 0.5, 1.0, 0.0])


def test_constant_image_rejected_with_its_value():
    with pytest.raises(RejectError, match=r"constant image \(min == max == 7\)"):
        minmax_normalize(np.full((32, 32), 7, dtype=np.uint8))


def test_nan_rejected():
    arr = np.ones((4, 4), dtype=np.float32)
    arr[1, 1] = np.nan
    with pytest.raises(RejectError, match="NaN"):
        minmax_normalize(arr)


def test_negative_slope_swaps_the_bounds_and_inverts():
    arr = np.array([[100, 150], [200, 300]], dtype=np.uint16)
    zero, one = minmax_bounds(arr, slope=-2.0, intercept=5.0)
    assert (zero, one) == (300.0, 100.0)
    np.testing.assert_allclose(scale_to_unit(arr, zero, one), 1.0 - minmax_normalize(arr), atol=1e-7)


def test_percentiles_under_negative_slope_match_normalising_the_grayscale():
    arr = np.random.default_rng(3).integers(0, 4096, (40, 50)).astype(np.uint16)
    arr[0, :3] = [0, 4095, 4095]  # outliers at both ends
    gray = -3.0 * arr.astype(np.float64) + 7.0  # what a rescale and a MONOCHROME1 inversion would give
    bounds = minmax_bounds(arr, 2.0, 97.0, slope=-3.0, intercept=7.0)
    np.testing.assert_allclose(scale_to_unit(arr, *bounds), minmax_normalize(gray, 2.0, 97.0), atol=1e-6)


def test_constant_image_reports_the_grayscale_value():
    flat = np.full((8, 8), 7, dtype=np.uint16)
    with pytest.raises(RejectError, match=r"constant image \(min == max == 93\)"):
        minmax_bounds(flat, slope=-1.0, intercept=100.0)
    with pytest.raises(RejectError, match=r"constant image \(min == max == 4\)"):
        minmax_bounds(np.arange(64).reshape(8, 8), slope=0.0, intercept=4.0)


def test_non_finite_linear_map_rejected():
    with pytest.raises(RejectError, match="NaN or infinite"):
        minmax_bounds(np.arange(16).reshape(4, 4), slope=float("nan"))


def test_luminance_uses_bt601_weights():
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    np.testing.assert_allclose(luminance(rgb), [[0.299 * 255, 0.587 * 255, 0.114 * 255, 255.0]])


def _textured(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.2, 0.8, (height, width)).astype(np.float32)


def test_foreground_strips_black_and_white_borders():
    img = _textured(100, 120)
    img[:10] = 0.0  # black collimation on top
    img[:, :5] = 0.0  # and on the left
    img[:, 113:] = 1.0  # a white frame on the right
    img[95:] = 0.01  # nearly black at the bottom, within tolerance
    assert foreground_box(img, 0.02) == (10, 5, 95, 113)


def test_foreground_strips_l_shaped_mixed_border():
    img = _textured(60, 80)
    img[:, :8] = 0.0  # black left border over the full height
    img[:6, 8:] = 1.0  # white top border right of it: no full top row or left column is uniform alone
    assert foreground_box(img, 0.02) == (6, 8, 60, 80)


def test_foreground_keeps_uniform_lines_inside():
    img = _textured(40, 40)
    img[20] = 0.0
    img[:, 20] = 1.0
    assert foreground_box(img, 0.02) == (0, 0, 40, 40)


def test_foreground_never_empty():
    img = np.zeros((40, 40), dtype=np.float32)
    img[20:] = 1.0  # every row is uniform
    assert foreground_box(img, 0.02) == (0, 0, 40, 40)


def test_foreground_tolerance_zero_needs_exactly_uniform_lines():
    img = _textured(30, 30)
    img[:4] = 0.0
    img[4] = 0.0
    img[4, 0] = 0.01
    assert foreground_box(img, 0.0) == (4, 0, 30, 30)
    assert foreground_box(img, 0.02) == (5, 0, 30, 30)


def _reference_box(pixels01: np.ndarray, tolerance: float) -> tuple[int, int, int, int]:
    """The foreground box the plain way: full row and column ranges of the float image, until stable."""
    height, width = pixels01.shape
    y0, x0, y1, x1 = 0, 0, height, width
    while True:
        uniform = np.ptp(pixels01[y0:y1, x0:x1], axis=1) <= tolerance
        if uniform.all():
            return 0, 0, height, width
        y0, y1 = y0 + int(np.argmin(uniform)), y1 - int(np.argmin(uniform[::-1]))
        uniform = np.ptp(pixels01[y0:y1, x0:x1], axis=0) <= tolerance
        if uniform.all():
            return 0, 0, height, width
        left, right = int(np.argmin(uniform)), int(np.argmin(uniform[::-1]))
        x0, x1 = x0 + left, x1 - right
        if left == right == 0:
            return y0, x0, y1, x1


@pytest.mark.parametrize("seed", range(6))
def test_foreground_of_stored_values_matches_the_normalised_image(seed):
    rng = np.random.default_rng(seed)
    height, width = rng.integers(160, 300, size=2)
    values = rng.integers(1000, 3000, (height, width)).astype(np.uint16)
    top, bottom, left, right = rng.integers(0, 70, size=4)  # up to 70 lines: several scan blocks
    border = rng.choice([400, 3600])
    values[:top] = border
    values[height - bottom :] = border
    values[:, :left] = border + rng.integers(0, 40, (height, 1))  # a little noise per row: below 0.02
    values[:, width - right :] = border
    values[height // 2, width // 2 : width // 2 + 2] = 0, 4095  # the bounds, inside the foreground
    zero, one = (4095.0, 0.0) if seed % 2 else (0.0, 4095.0)  # odd seeds: inverted (MONOCHROME1)
    expected = _reference_box(scale_to_unit(values, zero, one), 0.02)
    assert expected == (top, left, height - bottom, width - right)
    assert foreground_box_of(values, zero, one, 0.02) == expected
    assert foreground_box(scale_to_unit(values, zero, one), 0.02) == expected
