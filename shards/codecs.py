"""Image codecs for the shard members: float [0, 1] grayscale pixels <-> encoded bytes.

Four codecs, chosen by name (``CODECS``):

- ``jpg``: 8-bit baseline JPEG (Pillow/libjpeg-turbo), 1 channel, never progressive, so that nvJPEG on the
  GPU and DALI's CPU decoder both take it. Lossy; ``quality`` applies to this codec only.
- ``png``: 8-bit lossless PNG.
- ``png16``: 16-bit lossless PNG (tar extension ``png``; a reader tells it from ``png`` by the bit depth in
  the manifest, or by the decoded dtype).
- ``jp2``: 16-bit lossless JPEG 2000 (reversible 5/3 wavelet, ``irreversible=False``, JP2 container).

Quantization: 8-bit stores ``round(x * 255)``, 16-bit ``round(x * 65535)`` (round half to even); decoding
gives the integers back and ``to_float01`` divides by the dtype's maximum. The same pixels always give the
same bytes (no timestamps or other varying metadata are written).
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image


@dataclass(frozen=True)
class CodecSpec:
    """What a codec stores."""

    name: str
    """Codec name as used in configs and the manifest."""
    extension: str
    """Member extension in the tar (``<key>.<extension>``)."""
    bit_depth: int
    """Bits per stored sample: 8 (decodes to uint8) or 16 (decodes to uint16)."""
    lossless: bool
    """True when decode(encode(x)) gives back exactly the quantized pixels."""
    pillow_format: str
    """Pillow's format name for this codec."""


CODECS: dict[str, CodecSpec] = {
    "jpg": CodecSpec("jpg", "jpg", 8, False, "JPEG"),
    "png": CodecSpec("png", "png", 8, True, "PNG"),
    "png16": CodecSpec("png16", "png", 16, True, "PNG"),
    "jp2": CodecSpec("jp2", "jp2", 16, True, "JPEG2000"),
}

DEFAULT_JPEG_QUALITY = 95
# zlib level per PNG codec. Measured on noisy synthetic radiographs at 256x320 (benchmarks/codecs.py data):
# 8-bit, level 6 is 13% smaller than level 1 at half the speed, so keep the default 6; 16-bit, level 1 is
# within 2% of level 6's size and about 1.8x faster to encode (the noisy low byte barely compresses).
PNG_COMPRESS_LEVEL = {"png": 6, "png16": 1}


def _spec(codec: str) -> CodecSpec:
    try:
        return CODECS[codec]
    except KeyError:
        raise ValueError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}") from None


def extension(codec: str) -> str:
    """The member extension in the tar for ``codec`` (``png16`` -> ``png``)."""
    return _spec(codec).extension


def bit_depth(codec: str) -> int:
    """Bits per stored sample for ``codec``: 8 or 16."""
    return _spec(codec).bit_depth


def quantize(pixels01: np.ndarray, bits: int) -> np.ndarray:
    """Float [H, W] in [0, 1] -> uint8 (bits=8) or uint16 (bits=16) by ``round(x * max)``.

    Raises:
        ValueError: not a finite 2-D float array inside [0, 1], or an unsupported bit depth.
    """
    arr = np.asarray(pixels01)
    if arr.ndim != 2:
        raise ValueError(f"expected a 2-D [H, W] array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.floating):
        raise ValueError(f"expected float pixels in [0, 1], got dtype {arr.dtype}")
    if arr.size == 0:
        raise ValueError("empty image")
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0.0 or hi > 1.0:
        raise ValueError(f"pixels must be finite and inside [0, 1], got range [{lo}, {hi}]")
    if bits == 8:
        return np.rint(arr.astype(np.float64) * 255.0).astype(np.uint8)
    if bits == 16:
        return np.rint(arr.astype(np.float64) * 65535.0).astype(np.uint16)
    raise ValueError(f"unsupported bit depth {bits}")


def encode(pixels01: np.ndarray, codec: str, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encode float grayscale pixels in [0, 1] with ``codec``.

    Args:
        pixels01: [H, W] float array in [0, 1].
        codec: a key of ``CODECS``.
        quality: JPEG quality 1..100 (``jpg`` only; ignored by the lossless codecs).

    Returns:
        The encoded file bytes, identical for identical input.

    Raises:
        ValueError: unknown codec, bad quality, or pixels that are not a 2-D float image in [0, 1].
    """
    spec = _spec(codec)
    if spec.name == "jpg" and not 1 <= int(quality) <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality}")
    ints = quantize(pixels01, spec.bit_depth)
    buf = io.BytesIO()
    img = Image.fromarray(ints)  # uint8 -> mode "L", uint16 -> mode "I;16": one channel either way
    if spec.name == "jpg":
        # Baseline Huffman coding: no progressive scans, no arithmetic coding (nvJPEG's fast path).
        img.save(buf, format="JPEG", quality=int(quality), optimize=False, progressive=False)
    elif spec.pillow_format == "PNG":
        img.save(buf, format="PNG", compress_level=PNG_COMPRESS_LEVEL[spec.name])
    else:  # jp2: no quality_layers and the reversible wavelet -> mathematically lossless
        img.save(buf, format="JPEG2000", irreversible=False)
    return buf.getvalue()


def decode(data: bytes, codec: str) -> np.ndarray:
    """Decode bytes written by ``encode`` back to integers.

    Args:
        data: the encoded file bytes.
        codec: the codec they were written with.

    Returns:
        [H, W] uint8 for 8-bit codecs, uint16 for 16-bit ones.

    Raises:
        ValueError: the bytes do not decode to a single-channel image of the codec's bit depth.
    """
    spec = _spec(codec)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != spec.pillow_format:
                raise ValueError(f"expected {spec.pillow_format} data for codec {codec!r}, got {img.format}")
            mode = img.mode
            arr = np.asarray(img)
    except (OSError, SyntaxError) as err:  # Pillow's errors for truncated or unidentifiable data
        raise ValueError(f"cannot decode {codec!r} data: {err}") from err
    if arr.ndim != 2:
        raise ValueError(f"expected a single-channel image, got mode {mode} shape {arr.shape}")
    target = np.uint8 if spec.bit_depth == 8 else np.uint16
    if arr.dtype == target:
        return arr
    if spec.bit_depth == 16 and mode == "I" and arr.min() >= 0 and arr.max() <= 65535:
        return arr.astype(np.uint16)  # older Pillow opens 16-bit files as 32-bit mode "I"
    raise ValueError(f"codec {codec!r} expects {np.dtype(target).name} pixels, got mode {mode} ({arr.dtype})")


def to_float01(arr: np.ndarray) -> np.ndarray:
    """Integer pixels -> float32 in [0, 1], divided by the dtype's maximum (255 for uint8, 65535 for uint16).

    Raises:
        TypeError: ``arr`` is not of an unsigned integer dtype.
    """
    arr = np.asarray(arr)
    if not np.issubdtype(arr.dtype, np.unsignedinteger):
        raise TypeError(f"expected unsigned integer pixels, got dtype {arr.dtype}")
    return arr.astype(np.float32) / np.float32(np.iinfo(arr.dtype).max)
