"""Source image → bin image: the shrink-then-normalise path against normalising the full image first."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from radstream.bucketing.geometry import Bin, fit_geometry
from radstream.ingest.normalize import minmax_bounds
from radstream.ingest.readers import DecodedImage
from radstream.shards.builder.resample import REDUCING_GAP, box_mean, render_in_bin


def _decoded(values: np.ndarray, percentiles: tuple[float, float] = (0.0, 100.0), slope: float = 1.0):
    zero, one = minmax_bounds(values, *percentiles, slope=slope)
    return DecodedImage(values, zero, one, meta={}, may_clip=percentiles != (0.0, 100.0))


def _reference(decoded: DecodedImage, region: tuple[int, int, int, int], bin_: Bin, fit: str) -> np.ndarray:
    """The plain way: normalise the whole image as float, crop, let Pillow resize with the same gap, fit."""
    y0, x0, y1, x1 = region
    pixels = decoded.normalized()[y0:y1, x0:x1]
    geom = fit_geometry(y1 - y0, x1 - x0, bin_, fit)
    rh, rw = geom.resized
    resized = np.asarray(
        Image.fromarray(pixels).resize((rw, rh), Image.Resampling.BILINEAR, reducing_gap=REDUCING_GAP)
    )
    out = np.zeros((bin_.height, bin_.width), np.float32)
    cy0, cx0, cy1, cx1 = geom.crop_box
    py, px = geom.paste_offset
    out[py : py + cy1 - cy0, px : px + cx1 - cx0] = resized[cy0:cy1, cx0:cx1]
    return np.clip(out, 0.0, 1.0)


def _render(decoded: DecodedImage, region: tuple[int, int, int, int], bin_: Bin, fit: str) -> np.ndarray:
    y0, x0, y1, x1 = region
    return render_in_bin(decoded, region, fit_geometry(y1 - y0, x1 - x0, bin_, fit))


def _image(dtype, shape=(301, 257), seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]]
    top = 255 if dtype == np.uint8 else 4095
    smooth = (np.sin(yy / 17.0) + np.cos(xx / 23.0) + 2) / 4 * top
    return np.clip(smooth + rng.normal(0, top / 50, shape), 0, top).astype(dtype)


@pytest.mark.parametrize(("shape", "fy", "fx"), [((301, 257), 3, 4), ((64, 64), 2, 2), ((17, 40), 5, 1)])
def test_box_mean_is_pillows_reduce(shape, fy, fx):
    values = _image(np.uint16, shape)
    expected = np.asarray(Image.fromarray(values.astype(np.float32)).reduce((fx, fy)))
    got = box_mean(values, fy, fx)
    assert got.shape == expected.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-6)


@pytest.mark.parametrize("fit", ["pad", "crop", "stretch"])
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.uint8])
def test_render_matches_normalising_the_full_image_first(dtype, fit):
    values = _image(dtype)
    decoded = _decoded(values)
    got = _render(decoded, (0, 0, *values.shape), Bin(48, 64), fit)
    want = _reference(decoded, (0, 0, *values.shape), Bin(48, 64), fit)
    assert got.shape == (48, 64) and got.dtype == np.float32
    # 8-bit sources are box-reduced in 8 bits: each mean rounds to half a stored level at most.
    atol = 0.5 / (decoded.one - decoded.zero) + 1e-5 if dtype == np.uint8 else 1e-5
    np.testing.assert_allclose(got, want, atol=atol)
    if fit == "pad":
        assert got[:, 0].max() == 0.0  # the letterbox margin of a portrait image in a landscape bin


def test_inverted_source_renders_as_the_negative():
    values = _image(np.uint16)
    plain = _render(_decoded(values), (0, 0, *values.shape), Bin(64, 64), "stretch")
    inverted = _render(_decoded(values, slope=-1.0), (0, 0, *values.shape), Bin(64, 64), "stretch")
    np.testing.assert_allclose(inverted, 1.0 - plain, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint16, np.uint8])
def test_only_the_region_is_used(dtype):
    values = _image(dtype)
    region = (20, 30, 260, 230)
    decoded = _decoded(values)
    framed = values.copy()
    top = np.iinfo(dtype).max
    framed[:20], framed[:, :30], framed[260:], framed[:, 230:] = 0, top, top, 0  # outside: extremes
    framed_decoded = DecodedImage(framed, decoded.zero, decoded.one, meta={}, may_clip=False)
    got = _render(framed_decoded, region, Bin(64, 48), "pad")
    atol = 0.5 / (decoded.one - decoded.zero) + 1e-5 if dtype == np.uint8 else 1e-5
    np.testing.assert_allclose(got, _reference(decoded, region, Bin(64, 48), "pad"), atol=atol)


def test_percentile_clip_is_applied_before_shrinking():
    values = _image(np.uint16)
    values[::7, ::5] = (
        4095  # hot pixels: clipped by the percentile bounds, so shrinking must not average them
    )
    decoded = _decoded(values, percentiles=(1.0, 95.0))
    got = _render(decoded, (0, 0, *values.shape), Bin(48, 48), "stretch")
    np.testing.assert_allclose(
        got, _reference(decoded, (0, 0, *values.shape), Bin(48, 48), "stretch"), atol=1e-5
    )
