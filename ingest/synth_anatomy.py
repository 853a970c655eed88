"""Anatomy-like drawings for the synthetic radiograph corpus (``radstream.ingest.synth``).

Each body region is drawn on a small float canvas from a few smooth primitives (ellipses, rounded boxes,
capsules, arcs) placed in a *body frame*: the shorter image side spans [-1, 1], y grows downwards, and a random
pose (rotation, scale, shift, mirror) maps the body frame onto the pixels. The drawing is an attenuation map —
air ≈ 0, soft tissue ≈ 0.3, bone up to ≈ 1 — so bone is bright as a radiograph is displayed. ``draw`` adds
soft-tissue texture, a heel-effect gradient and a random contrast curve, and returns values in [0, 1].

Everything is vectorised numpy on a small canvas; ``radstream.ingest.synth_detector.radiograph`` upsamples it to the
detector size and adds what lives at full resolution there.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from radstream.ingest.synth_shapes import Canvas, bone, box, capsule, ellipse, ramp, smooth_noise

ELONGATED = frozenset({"spine", "upper_extremity", "lower_extremity", "whole_body"})
"""Regions drawn along the image's long axis (a landscape canvas is drawn transposed)."""


def _cranium(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    lateral = rng.random() < 0.4
    a, b = (0.74, 0.62) if lateral else (0.6, 0.72)
    a, b = a * rng.uniform(0.9, 1.1), b * rng.uniform(0.9, 1.1)
    cy = -0.12
    img = 0.22 * ramp(ellipse(c, 0, cy, a + 0.06, b + 0.06), 0.03)  # scalp
    img += 0.08 * ramp(ellipse(c, 0, cy, a, b), 0.03)  # brain
    img += bone(c, ellipse(c, 0, cy, a, b), cortex=0.035, marrow=0.4, rim=0.35)
    img -= 0.4 * ramp(ellipse(c, 0, cy, a - 0.07, b - 0.07), 0.03)  # hollow skull: only the vault is bone
    if lateral:
        img += 0.35 * ramp(ellipse(c, -0.05, cy + 0.25, 0.08, 0.06), 0.02) - 0.2 * ramp(
            ellipse(c, -0.05, cy + 0.24, 0.045, 0.03), 0.02
        )  # sella
        face = capsule(c, (0.55, cy + 0.35), (0.5, 0.62), 0.12)
        img += 0.25 * ramp(face, 0.03)
        jaw = np.minimum(
            capsule(c, (-0.15, 0.35), (-0.05, 0.78), 0.06), capsule(c, (-0.05, 0.78), (0.5, 0.72), 0.06)
        )
    else:
        for side in (-1, 1):
            orbit = ellipse(c, side * 0.22, 0.12, 0.13, 0.11)
            img += 0.3 * (ramp(orbit, 0.02) - ramp(orbit + 0.03, 0.02)) - 0.1 * ramp(orbit + 0.03, 0.02)
        img -= 0.12 * ramp(ellipse(c, 0, 0.33, 0.07, 0.12), 0.02)  # nasal cavity
        arc = np.abs(ellipse(c, 0, 0.28, 0.42, 0.42)) - 0.05
        jaw = np.where(c.Y > 0.42, arc, 1.0).astype(np.float32)
    img += bone(c, jaw, cortex=0.025, marrow=0.45, rim=0.3)
    return img


def _vertebrae(
    c: Canvas, rng: np.random.Generator, width: float, height: float, intensity: float
) -> np.ndarray:
    """A column of vertebral bodies (with disc gaps) along y, gently curved; returns the bone image."""
    gap = height * rng.uniform(0.25, 0.4)
    amp, freq, phase = rng.uniform(0.0, 0.12), rng.uniform(0.6, 1.6), rng.uniform(0, 2 * math.pi)
    img = np.zeros_like(c.X)
    y = -c.half_h - rng.uniform(0, height + gap)
    while y < c.half_h + height:
        cx = amp * math.sin(freq * y + phase)
        tilt = 0.3 * amp * math.cos(freq * y + phase)
        img += bone(c, box(c, cx, y, width, height / 2, tilt), cortex=0.03, marrow=intensity, rim=0.3)
        y += height + gap
    return img


def _spine(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    lateral = rng.random() < 0.4
    height = rng.uniform(0.22, 0.36)
    img = 0.3 * ramp(np.abs(c.X) - rng.uniform(0.9, 1.4), 0.1)  # the body around the column
    img += _vertebrae(c, rng, 0.3 if lateral else 0.34, height, 0.45)
    if lateral:  # posterior elements: a second, thinner column behind the bodies
        img += (
            0.25 * ramp(np.abs(c.X - 0.5) - 0.08, 0.03) * (0.6 + 0.4 * np.cos(c.Y * (2 * math.pi / height)))
        )
    else:  # pedicles seen end-on and the spinous processes on the midline
        period = 2 * math.pi / (height * 1.3)
        wave = 0.5 + 0.5 * np.cos(c.Y * period)
        img += 0.18 * ramp(np.abs(np.abs(c.X) - 0.2) - 0.05, 0.02) * wave
        img += 0.2 * ramp(np.abs(c.X) - 0.05, 0.02) * (1 - wave)
        img += 0.12 * ramp(np.abs(c.X) - 0.55, 0.05) * ramp(-(np.abs(c.X) - 0.34), 0.05) * wave  # processes
    return img


def _digit(
    c: Canvas, base: tuple[float, float], angle: float, lengths: list[float], radius: float
) -> np.ndarray:
    """A ray of bones (metacarpal/metatarsal + phalanges) from ``base`` in direction ``angle``, joint gaps."""
    dx, dy = math.sin(angle), -math.cos(angle)
    x, y = base
    d = np.full_like(c.X, 10.0)
    for i, length in enumerate(lengths):
        x1, y1 = x + dx * length, y + dy * length
        d = np.minimum(d, capsule(c, (x, y), (x1, y1), radius * (0.85**i)))
        x, y = x1 + dx * 0.05, y1 + dy * 0.05
    return d


def _hand(c: Canvas, rng: np.random.Generator, foot: bool) -> np.ndarray:
    spread = rng.uniform(0.8, 1.2)
    bones = np.full_like(c.X, 10.0)
    soft = np.full_like(c.X, 10.0)
    n_rays = 5
    for i in range(n_rays):
        off = (i - 2) * (0.17 if foot else 0.15)
        angle = off * spread * (0.5 if foot else 1.4)
        lengths = [0.55, 0.22, 0.14, 0.1] if not foot else [0.5, 0.14, 0.08, 0.06]
        if i == (0 if foot else 4):  # thumb / big toe: set off, one bone less
            angle += 0.0 if foot else 0.5
            lengths = lengths[:3]
        ray = _digit(c, (off, 0.55), angle, lengths, 0.065 if foot else 0.045)
        bones = np.minimum(bones, ray)
        soft = np.minimum(soft, ray - 0.07)
    for _ in range(7):  # carpals / tarsals
        bones = np.minimum(bones, ellipse(c, rng.uniform(-0.3, 0.3), rng.uniform(0.6, 0.85), 0.09, 0.07))
    if foot:
        bones = np.minimum(bones, ellipse(c, 0.0, 1.0, 0.28, 0.2))  # calcaneus
    soft = np.minimum(soft, ellipse(c, 0.0, 0.75, 0.55, 0.5))
    return 0.3 * ramp(soft, 0.06) + bone(c, bones, cortex=0.02, marrow=0.4, rim=0.35)


def _long_bones(c: Canvas, rng: np.random.Generator, radii: list[float], offsets: list[float]) -> np.ndarray:
    """Parallel long bones along y (slightly bowed) with bulbous ends; e.g. radius+ulna, tibia+fibula."""
    img = np.zeros_like(c.X)
    top, bottom = -c.half_h * rng.uniform(0.6, 0.95), c.half_h * rng.uniform(0.6, 0.95)
    for r, x in zip(radii, offsets, strict=True):
        bow = rng.uniform(-0.06, 0.06)
        d = np.minimum(capsule(c, (x, top), (x + bow, 0), r), capsule(c, (x + bow, 0), (x, bottom), r))
        for y_end in (top, bottom):
            d = np.minimum(d, ellipse(c, x, y_end, r * 1.7, r * 1.3))
        img += bone(c, d, cortex=r * 0.35, marrow=0.3, rim=0.45)
    return img


def _upper_extremity(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(3, p=[0.45, 0.3, 0.25])
    if kind == 0:
        return _hand(c, rng, foot=False)
    soft = 0.28 * ramp(np.abs(c.X) - rng.uniform(0.35, 0.5), 0.08)
    if kind == 1:
        return soft + _long_bones(c, rng, [0.07, 0.06], [-0.15, 0.16])
    head = bone(c, ellipse(c, 0.05, -c.half_h * 0.55, 0.24, 0.22), cortex=0.03, marrow=0.35, rim=0.35)
    return soft + head + _long_bones(c, rng, [0.1], [0.0])


def _lower_extremity(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    kind = rng.choice(3, p=[0.4, 0.35, 0.25])
    if kind == 2:
        return _hand(c, rng, foot=True)
    soft = 0.32 * ramp(np.abs(c.X) - rng.uniform(0.55, 0.75), 0.1)
    if kind == 1:
        return soft + _long_bones(c, rng, [0.17, 0.07], [-0.08, 0.3])
    jy = rng.uniform(-0.2, 0.2)  # knee joint line
    femur = np.minimum(
        capsule(c, (0, -c.half_h - 0.2), (0, jy - 0.25), 0.19), box(c, 0, jy - 0.15, 0.36, 0.14)
    )
    tibia = np.minimum(
        box(c, 0, jy + 0.12, 0.34, 0.09), capsule(c, (0, jy + 0.15), (0, c.half_h + 0.2), 0.16)
    )
    img = (
        soft
        + bone(c, femur, cortex=0.05, marrow=0.35, rim=0.4)
        + bone(c, tibia, cortex=0.05, marrow=0.35, rim=0.4)
    )
    img += bone(
        c, capsule(c, (0.32, jy + 0.2), (0.3, c.half_h + 0.2), 0.06), cortex=0.02, marrow=0.35, rim=0.35
    )
    img += 0.25 * ramp(ellipse(c, rng.uniform(-0.05, 0.05), jy - 0.25, 0.13, 0.17), 0.03)  # patella
    return img


def _ribs(c: Canvas, top: float, bottom: float, count: int, width: float, intensity: float) -> np.ndarray:
    """Posterior rib arcs on both sides of the midline, from ``top`` to ``bottom``."""
    img = np.zeros_like(c.X)
    lateral = np.abs(c.X)
    for i in range(count):
        y = top + (bottom - top) * i / max(count - 1, 1)
        a = width * (0.75 + 0.25 * i / count)
        arc = (
            np.abs(np.sqrt((lateral * (1 / a)) ** 2 + ((c.Y - y - 0.3) * (1 / 0.36)) ** 2) - 1) * 0.36 - 0.022
        )
        img += intensity * ramp(arc, 0.015) * (c.Y - y < 0.3) * (lateral > 0.08)
    return img


def _chest(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    w, tall = rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.1)  # thorax width, lung height
    heart, top = rng.uniform(0.8, 1.2), -0.08 - 0.62 * tall  # heart size, lung apex
    img = 0.35 * ramp(box(c, 0, 0.15, w, 1.5), 0.08)  # thorax
    lungs = np.minimum(
        ellipse(c, -0.38 * w, top + 0.62 * tall, 0.29 * w, 0.62 * tall, 0.08),
        ellipse(c, 0.38 * w, top + 0.6 * tall, 0.29 * w, 0.6 * tall, -0.08),
    )
    img -= rng.uniform(0.2, 0.3) * ramp(lungs, 0.06)
    img += 0.22 * ramp(ellipse(c, 0.13 * w, 0.3, 0.3 * w * heart, 0.24 * heart, -0.3), 0.05)  # heart shadow
    img += 0.15 * ramp(np.abs(c.X) - 0.08, 0.03)  # mediastinum + spine
    img += _ribs(c, top, top + 1.1 * tall, int(rng.integers(8, 11)), 0.72 * w, 0.14)
    for side in (-1, 1):  # clavicles
        p0, p1 = (side * 0.1, top + 0.04), (side * 0.62 * w, top - rng.uniform(0.06, 0.18))
        img += bone(c, capsule(c, p0, p1, 0.035), 0.015, 0.35, 0.2)
    return img


def _breast(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    wall = -c.half_w  # chest wall on one image edge (the canvas mirror picks the side)
    a = (2 * c.half_w) * rng.uniform(0.55, 0.85)
    b = c.half_h * rng.uniform(0.7, 0.92)
    dome = ellipse(c, wall, rng.uniform(-0.1, 0.1), a, b)
    inside = ramp(dome, 0.02)
    depth = np.clip(1 - (c.X - wall) / a, 0, 1)  # 1 at the chest wall, 0 at the nipple
    texture = smooth_noise(rng, c.X.shape, 10) + 0.5 * smooth_noise(rng, c.X.shape, 28)
    gland = np.clip(0.5 + 0.35 * texture, 0, 1) * depth**0.7
    img = inside * (0.25 + 0.35 * gland) + 0.1 * (inside - ramp(dome + 0.02, 0.01))  # skin line
    if rng.random() < 0.6:  # MLO view: pectoral muscle in the upper corner
        img += 0.25 * ramp((c.X - wall) / (0.6 * a) + (c.Y + c.half_h) / (0.9 * b) - 1, 0.03) * inside
    return img


def _abdomen(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    img = 0.4 * ramp(box(c, 0, 0.0, rng.uniform(0.95, 1.2), 1.6), 0.1)
    img += _vertebrae(c, rng, 0.22, rng.uniform(0.2, 0.26), 0.25) * ramp(np.abs(c.X) - 0.3, 0.01)
    for side in (-1, 1):
        img += 0.06 * ramp(ellipse(c, side * 0.3, 0.2, 0.12, 0.6, side * 0.25), 0.05)  # psoas
    gas = np.full_like(c.X, 10.0)
    for _ in range(int(rng.integers(14, 30))):
        x, y = rng.uniform(-0.75, 0.75), rng.uniform(-0.75, 0.75)
        r = rng.uniform(0.04, 0.12)
        gas = np.minimum(gas, ellipse(c, x, y, r * rng.uniform(0.7, 1.6), r, rng.uniform(0, 3)))
    img -= 0.22 * ramp(gas, 0.03)
    return img


def _pelvis(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    img = 0.35 * ramp(box(c, 0, 0.0, 1.4, 1.4), 0.1)
    d = np.full_like(c.X, 10.0)
    for side in (-1, 1):
        d = np.minimum(d, ellipse(c, side * 0.5, -0.32, 0.42, 0.3, side * 0.45))  # iliac wings
        head = ellipse(c, side * 0.55, 0.22, 0.15, 0.15)
        neck = capsule(c, (side * 0.55, 0.22), (side * 0.75, 0.45), 0.09)
        shaft = capsule(c, (side * 0.75, 0.45), (side * 0.8, 1.8), 0.14)
        img += bone(c, np.minimum(np.minimum(head, neck), shaft), cortex=0.03, marrow=0.35, rim=0.35)
        ring = np.abs(ellipse(c, side * 0.25, 0.45, 0.13, 0.09)) - 0.035  # obturator foramen rim
        img += 0.3 * ramp(ring, 0.015)
    d = np.minimum(d, box(c, 0, -0.25, 0.17, 0.28))  # sacrum
    img += bone(c, d, cortex=0.035, marrow=0.3, rim=0.3)
    img += 0.3 * ramp(np.abs(ellipse(c, 0, 0.05, 0.36, 0.27)) - 0.03, 0.015)  # pelvic inlet
    img += bone(c, box(c, 0, -0.75, 0.24, 0.12), cortex=0.03, marrow=0.3, rim=0.3)  # L5
    return img


def _whole_body(c: Canvas, rng: np.random.Generator) -> np.ndarray:
    s = c.half_h / 1.1  # the whole skeleton fits the (tall) field
    img = 0.3 * ramp(
        np.minimum(ellipse(c, 0, -0.85 * s, 0.2 * s, 0.25 * s), box(c, 0, 0.1 * s, 0.5, 0.9 * s)), 0.05
    )
    img += bone(c, ellipse(c, 0, -0.85 * s, 0.16 * s, 0.2 * s), cortex=0.03, marrow=0.15, rim=0.4)
    img += 0.3 * ramp(np.abs(c.X) - 0.05, 0.02) * (np.abs(c.Y) < 0.5 * s)
    img -= 0.15 * ramp(
        np.minimum(ellipse(c, -0.2, -0.3 * s, 0.15, 0.22 * s), ellipse(c, 0.2, -0.3 * s, 0.15, 0.22 * s)),
        0.03,
    )
    legs = np.minimum(
        capsule(c, (-0.2, 0.45 * s), (-0.22, 1.2 * s), 0.06),
        capsule(c, (0.2, 0.45 * s), (0.22, 1.2 * s), 0.06),
    )
    arms = np.minimum(
        capsule(c, (-0.45, -0.6 * s), (-0.55, 0.3 * s), 0.04),
        capsule(c, (0.45, -0.6 * s), (0.55, 0.3 * s), 0.04),
    )
    img += bone(
        c, np.minimum(np.minimum(legs, arms), ellipse(c, 0, 0.4 * s, 0.35, 0.12 * s)), 0.02, 0.35, 0.3
    )
    return img


RENDERERS: dict[str, Callable[[Canvas, np.random.Generator], np.ndarray]] = {
    "whole_body": _whole_body,
    "cranium": _cranium,
    "spine": _spine,
    "upper_extremity": _upper_extremity,
    "chest": _chest,
    "breast": _breast,
    "abdomen": _abdomen,
    "pelvis": _pelvis,
    "lower_extremity": _lower_extremity,
}
"""Region name → drawing function (body-frame attenuation map on the canvas)."""


def _soften(img: np.ndarray, passes: int) -> None:
    """Binomial [1, 2, 1] / 4 blur along both axes, ``passes`` times, in place (focal-spot unsharpness)."""
    for _ in range(passes):
        img[1:-1] = (img[:-2] + 2 * img[1:-1] + img[2:]) * 0.25
        img[:, 1:-1] = (img[:, :-2] + 2 * img[:, 1:-1] + img[:, 2:]) * 0.25


_MAX_ROTATION_DEG = {"upper_extremity": 25.0, "lower_extremity": 15.0, "breast": 3.0}


def draw(region: str, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """Draw the anatomy of ``region`` on an h×w canvas (no pixel noise, no borders).

    Args:
        region: a key of ``RENDERERS``.
        h, w: canvas size in pixels.
        rng: the image's random generator (pose, anatomy variation, contrast).

    Returns:
        float32 [h, w] in [0, 1], bone bright, noise-free but textured.
    """
    transpose = region in ELONGATED and w > h
    ch, cw = (w, h) if transpose else (h, w)
    canvas = Canvas(ch, cw, rng, _MAX_ROTATION_DEG.get(region, 6.0))
    att = RENDERERS[region](canvas, rng)
    body = att > 0.05
    att = att + body * (0.035 * smooth_noise(rng, (ch, cw), rng.integers(4, 9)))
    _soften(att, int(rng.integers(0, 3)))
    if transpose:
        att = att.T
    gy, gx = rng.uniform(-0.08, 0.08, size=2)  # heel effect: a gentle exposure gradient
    att = att * (
        1
        + gy * np.linspace(-1, 1, h, dtype=np.float32)[:, None]
        + gx * np.linspace(-1, 1, w, dtype=np.float32)
    )
    # film-like response: saturates softly, so overlapping bones keep their detail instead of clipping
    img = 1.0 - np.exp(np.maximum(att, 0.0) * -rng.uniform(1.4, 2.0))
    img = np.clip(img * rng.uniform(1.0, 1.2) + rng.uniform(0.0, 0.05), 0.0, 1.0) ** rng.uniform(0.8, 1.25)
    return np.ascontiguousarray(img, dtype=np.float32)
