"""A decoded source image → its bin image: shrink the stored numbers, normalise the small result, fit.

After decoding, the shard build used to spend its time in passes over the full-size image as float (normalise,
find the borders, copy into Pillow, box-reduce). Here the full-size image is read once, by a box reduction of
the stored numbers (Pillow's 8-bit one, or :func:`box_mean`), to about ``REDUCING_GAP`` times the target size;
the antialiased resize and the min-max map then run on small images only. Min-max normalisation is linear
when its bounds clip nothing, and box reduction and bilinear resizing are weighted means, so normalising last
equals normalising first up to rounding. Sources whose normalisation clips (percentile bounds) or whose values
float32 cannot hold exactly are normalised at full size first instead.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from radstream.bucketing.geometry import FitGeometry
from radstream.ingest.normalize import scale_to_unit
from radstream.ingest.readers import DecodedImage

REDUCING_GAP = 2.0
"""Box-reduce by an integer factor only while the result stays at least this many times the target size (per
side); the antialiased bilinear resize does the rest. Pillow's rule (``reducing_gap``), at the value its
``thumbnail`` uses. On the benchmark corpus, against a resize of the whole image with no reduction, the mean
error is 0.07 of an 8-bit level (0.02 with 3.0), and shrinking plus resizing take 40% less time."""

# Dtypes whose values float32 holds exactly: shrinking them before normalising loses nothing.
_EXACT_IN_FLOAT32 = (np.uint8, np.uint16, np.int8, np.int16, np.float32)


def reduce_factors(src_height: int, src_width: int, out_height: int, out_width: int) -> tuple[int, int]:
    """Integer box-reduction factors ``(fy, fx)`` that keep ``REDUCING_GAP`` times the output size."""
    fy = max(1, int(src_height / out_height / REDUCING_GAP))
    fx = max(1, int(src_width / out_width / REDUCING_GAP))
    return fy, fx


def box_mean(values: np.ndarray, fy: int, fx: int) -> np.ndarray:
    """The mean of every ``fy x fx`` block of ``values`` as float32, like Pillow's ``Image.reduce``.

    Blocks that the image's bottom or right edge cuts short average the pixels they hold. Rows are summed as
    whole strided rows, then columns on the ``fy`` times smaller result, so the full-size image is read once
    and never copied (Pillow would first convert a 16-bit image to a full-size float one).
    """
    height, width = values.shape
    rows = values[0::fy].astype(np.float32)
    for k in range(1, fy):
        part = values[k::fy]
        rows[: len(part)] += part
    out = rows[:, 0::fx].copy()
    for k in range(1, fx):
        part = rows[:, k::fx]
        out[:, : part.shape[1]] += part
    out /= fy * fx
    if height % fy:
        out[-1] *= fy / (height % fy)
    if width % fx:
        out[:, -1] *= fx / (width % fx)
    return out


def _linear_values(decoded: DecodedImage) -> tuple[np.ndarray, float, float]:
    """Values and bounds such that normalising commutes with shrinking (no clipping, exact as float32)."""
    if decoded.values.dtype in _EXACT_IN_FLOAT32 and not decoded.may_clip:
        return decoded.values, decoded.zero, decoded.one
    return decoded.normalized(), 0.0, 1.0


def _shrink(values: np.ndarray, fy: int, fx: int) -> Image.Image:
    """``values`` box-reduced by ``fy x fx``, as a Pillow "F" image."""
    if values.dtype == np.uint8:
        # Pillow reduces 8-bit data fastest, reading the array's own buffer; it rounds each block mean to a
        # whole stored level (at most half a level off, then averaged again by the resize).
        return Image.fromarray(values).reduce((fx, fy)).convert("F")
    return Image.fromarray(box_mean(values, fy, fx))


def render_in_bin(decoded: DecodedImage, region: tuple[int, int, int, int], geom: FitGeometry) -> np.ndarray:
    """The bin image of one source: ``region`` of it, normalised to [0, 1] and fitted as ``geom`` says.

    Args:
        decoded: the decoded source.
        region: ``(y0, x0, y1, x1)`` in source pixels, the part that goes into the bin (the whole image, or
            its foreground box); ``geom`` was made for this region's size. Pixels outside it play no part.
        geom: the fit of the region into its bin.

    Returns:
        float32 ``[bin height, bin width]`` in [0, 1].
    """
    values, zero, one = _linear_values(decoded)
    y0, x0, y1, x1 = region
    rh, rw = geom.resized
    fy, fx = reduce_factors(y1 - y0, x1 - x0, rh, rw)
    small = _shrink(values[y0:y1, x0:x1], fy, fx)
    # The exact source extent in reduced pixels: an edge pixel may stand for fewer than fy x fx pixels.
    box = (0.0, 0.0, (x1 - x0) / fx, (y1 - y0) / fy)
    resized = small.resize((rw, rh), Image.Resampling.BILINEAR, box=box)
    # Normalising commutes with the resize (a weighted mean), so it runs on the small output only.
    unit = scale_to_unit(np.asarray(resized), zero, one)
    out = np.zeros((geom.bin.height, geom.bin.width), dtype=np.float32)
    cy0, cx0, cy1, cx1 = geom.crop_box
    py, px = geom.paste_offset
    out[py : py + cy1 - cy0, px : px + cx1 - cx0] = unit[cy0:cy1, cx0:cx1]
    return out
