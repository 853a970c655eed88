"""Drawing primitives of the synthetic anatomy (``radstream.ingest.synth_anatomy``): the posed body frame of a canvas
and smooth shapes on it (ellipses, rounded boxes, capsules, bone with cortex and marrow, smooth noise).
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image


class Canvas:
    """Body-frame coordinates of every canvas pixel after a random pose.

    Attributes:
        X, Y: float32 [h, w] body-frame coordinates (y downwards).
        half_w, half_h: half extents of the field of view in body units (before the pose).
        px: one pixel in body units: the narrowest edge a primitive may have.
    """

    def __init__(self, h: int, w: int, rng: np.random.Generator, max_rotation_deg: float):
        unit = min(h, w) / 2.0
        scale = rng.uniform(0.85, 1.15)
        angle = math.radians(rng.uniform(-max_rotation_deg, max_rotation_deg))
        shift = rng.uniform(-0.08, 0.08, size=2)
        ys = ((np.arange(h, dtype=np.float32) + 0.5 - h / 2) / unit - shift[0])[:, None]
        xs = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) / unit - shift[1])[None, :]
        if rng.random() < 0.5:  # mirror: left/right views, patient facing either way
            xs = -xs
        co, si = math.cos(angle) / scale, math.sin(angle) / scale
        self.X = (co * xs + si * ys).astype(np.float32)
        self.Y = (-si * xs + co * ys).astype(np.float32)
        self.half_w, self.half_h = w / 2 / unit / scale, h / 2 / unit / scale
        self.px = 1.0 / unit / scale


def ramp(d: np.ndarray, width: float) -> np.ndarray:
    """1 inside (d < 0), 0 outside, linear over ``width`` around the edge: a cheap smooth indicator."""
    return np.clip(0.5 - d * (1.0 / width), 0.0, 1.0)


def ellipse(c: Canvas, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance to an ellipse with half axes (a, b) turned by ``angle`` radians."""
    x, y = c.X - cx, c.Y - cy
    if angle:
        co, si = math.cos(angle), math.sin(angle)
        x, y = co * x + si * y, -si * x + co * y
    return (np.sqrt((x * (1.0 / a)) ** 2 + (y * (1.0 / b)) ** 2) - 1.0) * min(a, b)


def box(c: Canvas, cx: float, cy: float, a: float, b: float, angle: float = 0.0) -> np.ndarray:
    """Approximate signed distance to a rounded box (superellipse of power 4) with half sides (a, b)."""
    x, y = c.X - cx, c.Y - cy
    if angle:
        co, si = math.cos(angle), math.sin(angle)
        x, y = co * x + si * y, -si * x + co * y
    qx, qy = (x * (1.0 / a)) ** 2, (y * (1.0 / b)) ** 2  # ** 4 would call pow(): 40x slower than squaring
    return (np.sqrt(np.sqrt(qx * qx + qy * qy)) - 1.0) * min(a, b)


def capsule(c: Canvas, p0: tuple[float, float], p1: tuple[float, float], radius: float) -> np.ndarray:
    """Signed distance to a capsule: the segment p0-p1 (x, y) thickened by ``radius``."""
    (x0, y0), (x1, y1) = p0, p1
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((c.X - x0) * dx + (c.Y - y0) * dy) * (1.0 / max(dx * dx + dy * dy, 1e-9)), 0.0, 1.0)
    return np.sqrt((c.X - x0 - t * dx) ** 2 + (c.Y - y0 - t * dy) ** 2) - radius


def bone(c: Canvas, d: np.ndarray, cortex: float, marrow: float = 0.5, rim: float = 0.35) -> np.ndarray:
    """A bone from its signed distance: a marrow fill plus a brighter cortical rim ``cortex`` thick."""
    edge = max(c.px, 0.012)
    inside = ramp(d, edge)
    return marrow * inside + rim * (inside - ramp(d + cortex, edge))


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Zero-mean smooth random field (about ``cells`` blobs along the shorter side), unit-ish amplitude."""
    h, w = shape
    ch = max(2, round(cells * h / min(h, w)))
    cw = max(2, round(cells * w / min(h, w)))
    small = rng.standard_normal((ch, cw)).astype(np.float32)
    return np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC))


# --- regions ---------------------------------------------------------------------------------------------
