"""What the detector adds to the drawn anatomy (``radstream.ingest.synth_anatomy``), at full resolution: upsampling to
the detector size, quantum + electronic noise, black collimation margins, a white or grey frame, a burned-in
side / view marker.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from radstream.ingest.synth_anatomy import draw

CANVAS_SIDE = 320
"""Longest side the anatomy is drawn at; larger images are upsampled (the anatomy is smooth anyway)."""

# Standard normal values looked up by random 16-bit indices: 4x faster than Generator.standard_normal.
_GAUSS = np.sort(np.random.default_rng(20240229).standard_normal(65536)).astype(np.float32)

_GLYPHS = {  # 5×7 bitmap letters of the burned-in side / view markers
    "L": "10000 10000 10000 10000 10000 10000 11111",
    "R": "11110 10001 10001 11110 10100 10010 10001",
    "A": "01110 10001 10001 11111 10001 10001 10001",
    "P": "11110 10001 10001 11110 10000 10000 10000",
    "T": "11111 00100 00100 00100 00100 00100 00100",
}
_MARKERS = ("L", "R", "AP", "PA", "LAT")


def _marker_bitmap(text: str) -> np.ndarray:
    """The text as a bool bitmap (7 rows), one blank column between letters, one blank pixel all around."""
    cols = []
    for letter in text:
        rows = [[c == "1" for c in row] for row in _GLYPHS[letter].split()]
        cols += [np.array(rows), np.zeros((7, 1), bool)]
    return np.pad(np.concatenate(cols[:-1], axis=1), 1)


def _burn_marker(img: np.ndarray, box: tuple[int, int, int, int], rng: np.random.Generator) -> None:
    """Burn a marker (white letters, or black letters in a white block) into a corner of the field."""
    glyph = _marker_bitmap(str(rng.choice(_MARKERS)))
    y0, x0, y1, x1 = box
    k = max(1, round(min(y1 - y0, x1 - x0) * rng.uniform(0.035, 0.06) / glyph.shape[0]))
    glyph = np.kron(glyph, np.ones((k, k), bool))
    gh, gw = glyph.shape
    if gh + 2 * k > y1 - y0 or gw + 2 * k > x1 - x0:
        return
    top = y0 + k if rng.random() < 0.5 else y1 - gh - k
    left = x0 + k if rng.random() < 0.5 else x1 - gw - k
    patch = img[top : top + gh, left : left + gw]
    if rng.random() < 0.5:
        patch[glyph] = 1.0
    else:
        patch[...] = np.where(glyph, 0.0, 1.0)


def _borders(img: np.ndarray, rng: np.random.Generator) -> None:
    """Collimation (uniform 0 margins on some sides), maybe a marker, maybe a white or grey frame; in place."""
    h, w = img.shape
    y0, x0, y1, x1 = 0, 0, h, w
    if rng.random() < 0.45:
        cut = [int(s * rng.uniform(0.02, 0.15)) if rng.random() < 0.6 else 0 for s in (h, w, h, w)]
        y0, x0, y1, x1 = cut[0], cut[1], h - cut[2], w - cut[3]
        img[:y0], img[y1:], img[:, :x0], img[:, x1:] = 0.0, 0.0, 0.0, 0.0
    if rng.random() < 0.35:
        _burn_marker(img, (y0, x0, y1, x1), rng)
    if rng.random() < 0.1:
        value = 1.0 if rng.random() < 0.5 else rng.uniform(0.5, 0.9)
        t = max(2, round(min(h, w) * rng.uniform(0.005, 0.02)))
        for edge in (np.s_[:t, :], np.s_[:, :t], np.s_[-t:, :], np.s_[:, -t:]):  # top, left, bottom, right
            if rng.random() < 0.7:
                img[edge] = value


def radiograph(region: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic radiograph of ``region`` at its full h×w size.

    The anatomy is drawn on a canvas of at most ``CANVAS_SIDE`` a side and upsampled (bicubic); then signal-
    dependent quantum noise (σ ∝ √signal) plus electronic noise, collimation margins, markers and frames are
    added at full resolution.

    Returns:
        float32 [h, w] in [0, 1], bone bright; collimation margins exactly 0.
    """
    f = min(1.0, CANVAS_SIDE / max(h, w))
    ch, cw = max(8, round(h * f)), max(8, round(w * f))
    img = draw(region, ch, cw, rng)
    if (ch, cw) != (h, w):
        img = np.array(Image.fromarray(img).resize((w, h), Image.BICUBIC))
    sigma = np.sqrt(np.maximum(img, 0.0, out=img), dtype=np.float32)
    sigma *= rng.uniform(0.008, 0.03)
    sigma += rng.uniform(0.001, 0.004)
    sigma *= _GAUSS[rng.integers(0, 65536, size=(h, w), dtype=np.uint16)]
    img += sigma
    np.clip(img, 0.0, 1.0, out=img)
    _borders(img, rng)
    return img
