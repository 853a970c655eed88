"""Bin shapes and how a source image is fitted into one.

A :class:`Bin` is a ``(height, width)`` in pixels, a multiple of the ViT patch size on both sides. An image of
any size is fitted into its bin in one of three ways (:data:`FIT_MODES`):

- ``stretch``: resize to exactly the bin shape; the aspect ratio changes (the study's 224x224 recipe).
- ``pad``: keep the aspect ratio, resize to fit inside the bin, paste centred on a black canvas (letterbox).
- ``crop``: keep the aspect ratio, resize to cover the bin, cut the centre window out.

:func:`fit_geometry` describes the fit for one image; :func:`fit_sizes` is the same arithmetic over arrays,
used for planning reports over hundreds of thousands of images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

FIT_MODES = ("stretch", "pad", "crop")

_SHAPE_RE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")


@dataclass(frozen=True, order=True)
class Bin:
    """One bin shape in pixels; ordered by (height, width)."""

    height: int
    width: int

    def __post_init__(self) -> None:
        if self.height < 1 or self.width < 1:
            raise ValueError(f"bin shape must be positive, got {self.height}x{self.width}")

    @property
    def name(self) -> str:
        """The bin's name as used in shard paths, e.g. ``"224x288"``."""
        return f"{self.height}x{self.width}"

    @property
    def aspect(self) -> float:
        """Height over width."""
        return self.height / self.width

    def tokens(self, patch_size: int) -> int:
        """Number of ViT patches (tokens) of an image of this shape.

        Raises:
            ValueError: a side is not a multiple of ``patch_size``.
        """
        if self.height % patch_size or self.width % patch_size:
            raise ValueError(f"bin {self.name} is not a multiple of the patch size {patch_size}")
        return (self.height // patch_size) * (self.width // patch_size)

    @classmethod
    def parse(cls, text: str) -> Bin:
        """A bin from its name, ``"HxW"``.

        Raises:
            ValueError: the text is not two positive integers joined by ``x``.
        """
        match = _SHAPE_RE.match(text) if isinstance(text, str) else None
        if match is None:
            raise ValueError(f"not a bin shape (expected 'HxW', e.g. '224x288'): {text!r}")
        return cls(int(match.group(1)), int(match.group(2)))


def parse_bins(text: str, patch_size: int | None = None) -> list[Bin]:
    """User-given bin shapes, ``"224x224,192x256,256x192"`` → sorted, de-duplicated bins.

    Args:
        text: comma-separated ``HxW`` shapes.
        patch_size: when given, every side must be a multiple of it.

    Raises:
        ValueError: junk, an empty list, or a side that is not a multiple of ``patch_size``.
    """
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError(f"no bin shapes in {text!r}")
    bins = sorted({Bin.parse(p) for p in parts})
    if patch_size is not None:
        for b in bins:
            b.tokens(patch_size)
    return bins


def as_sizes(sizes: np.ndarray | Sequence[Sequence[int]]) -> np.ndarray:
    """Validate source sizes as an int64 ``[N, 2]`` array of positive ``(height, width)`` pairs."""
    arr = np.asarray(sizes, dtype=np.int64)
    if arr.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"image sizes must be an [N, 2] array of (height, width), got shape {arr.shape}")
    if np.any(arr < 1):
        raise ValueError("image sizes must be positive (height, width) pairs")
    return arr


def fit_sizes(
    height: np.ndarray, width: np.ndarray, bin_height: np.ndarray, bin_width: np.ndarray, mode: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Vectorised fit arithmetic: resized size and offset of sources in their bins.

    Args:
        height, width: source sizes in pixels (broadcastable integer arrays).
        bin_height, bin_width: the bin shape of each source.
        mode: one of :data:`FIT_MODES`.

    Returns:
        ``(resized_height, resized_width, offset_y, offset_x)`` as int64 arrays, offsets as in
        :attr:`FitGeometry.offset`.
    """
    h, w = np.asarray(height, np.float64), np.asarray(width, np.float64)
    bh, bw = np.asarray(bin_height, np.int64), np.asarray(bin_width, np.int64)
    if mode == "stretch":
        rh, rw = np.broadcast_arrays(bh, bw)
        zero = np.zeros_like(rh)
        return rh.copy(), rw.copy(), zero, zero.copy()
    if mode == "pad":
        scale = np.minimum(bh / h, bw / w)
        rh = np.clip(np.floor(h * scale + 0.5).astype(np.int64), 1, bh)
        rw = np.clip(np.floor(w * scale + 0.5).astype(np.int64), 1, bw)
        return rh, rw, (bh - rh) // 2, (bw - rw) // 2
    if mode == "crop":
        scale = np.maximum(bh / h, bw / w)
        rh = np.maximum(np.floor(h * scale + 0.5).astype(np.int64), bh)
        rw = np.maximum(np.floor(w * scale + 0.5).astype(np.int64), bw)
        return rh, rw, (rh - bh) // 2, (rw - bw) // 2
    raise ValueError(f"unknown fit mode {mode!r}; expected one of {FIT_MODES}")


@dataclass(frozen=True)
class FitGeometry:
    """How one source image of ``source_height x source_width`` maps into its bin.

    To produce the bin image: resize the source to ``resized`` (height, width); then for ``pad`` paste it at
    ``offset`` on a zero canvas of the bin shape, for ``crop`` cut the bin-sized window at ``offset`` out of
    it, for ``stretch`` it already is the bin image. Equivalently, for every mode: cut ``crop_box`` out of the
    resized image and paste it at ``paste_offset``.
    """

    mode: str
    source_height: int
    source_width: int
    bin: Bin
    resized: tuple[int, int]
    """(height, width) the source is resized to."""
    offset: tuple[int, int]
    """(y, x): pad → where the resized image is pasted in the bin (the letterbox margin); crop → where the
    bin-sized window starts in the resized image; stretch → (0, 0)."""

    @property
    def paste_offset(self) -> tuple[int, int]:
        """(y, x) in the bin where the (cropped) resized image is pasted."""
        return self.offset if self.mode == "pad" else (0, 0)

    @property
    def crop_box(self) -> tuple[int, int, int, int]:
        """(y0, x0, y1, x1), half-open, the window of the resized image that lands in the bin.

        Note that PIL's ``Image.crop`` takes ``(x0, y0, x1, y1)``.
        """
        if self.mode == "crop":
            y0, x0 = self.offset
            return y0, x0, y0 + self.bin.height, x0 + self.bin.width
        return 0, 0, self.resized[0], self.resized[1]

    def map_box(self, box: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """Map a source box ``(y0, x0, y1, x1)`` (half-open, source pixels) into bin coordinates.

        The start is rounded down and the end up (the mapped box covers every bin pixel the source box
        touches), then both are clipped to the bin. A box that falls entirely into a cropped-off margin comes
        back empty (``y0 == y1`` or ``x0 == x1``).

        Raises:
            ValueError: the box is not inside the source.
        """
        y0, x0, y1, x1 = (int(v) for v in box)
        sh, sw = self.source_height, self.source_width
        if not (0 <= y0 <= y1 <= sh and 0 <= x0 <= x1 <= sw):
            raise ValueError(f"box {tuple(box)} is not inside the {sh}x{sw} source")
        (rh, rw), (py, px), (cy, cx, _, _) = self.resized, self.paste_offset, self.crop_box
        dy, dx = py - cy, px - cx
        # Exact integer arithmetic: floor(v * rh / sh) and ceil(v * rh / sh).
        by0, bx0 = (y0 * rh) // sh + dy, (x0 * rw) // sw + dx
        by1, bx1 = -((-y1 * rh) // sh) + dy, -((-x1 * rw) // sw) + dx
        by0, by1 = (min(max(v, 0), self.bin.height) for v in (by0, by1))
        bx0, bx1 = (min(max(v, 0), self.bin.width) for v in (bx0, bx1))
        return by0, bx0, by1, bx1


def fit_geometry(height: int, width: int, bin: Bin, mode: str) -> FitGeometry:
    """The fit of a ``height x width`` source into ``bin`` for a fit mode (see :data:`FIT_MODES`).

    Raises:
        ValueError: unknown mode or a non-positive source size.
    """
    if height < 1 or width < 1:
        raise ValueError(f"source size must be positive, got {height}x{width}")
    rh, rw, oy, ox = fit_sizes(
        np.array(height), np.array(width), np.array(bin.height), np.array(bin.width), mode
    )
    return FitGeometry(mode, int(height), int(width), bin, (int(rh), int(rw)), (int(oy), int(ox)))
