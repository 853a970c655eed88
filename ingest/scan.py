"""Cheap header-only scan of every input: size, format and patient id, before any pixel is decoded.

The build plans bins and splits from this scan, so it must stay fast (no pixel decoding) and must turn every
unusable file into a one-line reject rather than an exception.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ingest.errors import RejectError
from ingest.readers import ReadConfig, read_dicom_header

PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "TIFF": "tiff"}


@dataclass(frozen=True)
class HeaderInfo:
    """What the scan learns about one input without decoding its pixels."""

    format: str
    height: int
    width: int
    patient_id: str | None


def _is_dicom(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def scan_header(path: str | Path, cfg: ReadConfig) -> HeaderInfo:
    """Read the size and format of one image from its header.

    Raises:
        RejectError: unreadable file, not an image, absurd dimensions or a side smaller than ``cfg.min_side``.
    """
    path = Path(path)
    try:
        if path.suffix.lower() in (".dcm", ".dicom") or _is_dicom(path):
            head = read_dicom_header(path)
            info = HeaderInfo("dicom", int(head["rows"]), int(head["cols"]), head.get("patient_id"))
        else:
            info = _scan_pil(path)
    except OSError as err:
        raise RejectError(f"unreadable file ({err.strerror or err})") from None
    pixels = info.height * info.width
    if pixels > cfg.max_pixels:
        raise RejectError(
            f"absurd dimensions {info.height}x{info.width} ({pixels} pixels > max_pixels {cfg.max_pixels})"
        )
    if min(info.height, info.width) < cfg.min_side:
        raise RejectError(f"image {info.height}x{info.width} is smaller than one patch ({cfg.min_side} px)")
    return info


def _scan_pil(path: Path) -> HeaderInfo:
    # Image.open reads only the header; the decompression-bomb guard is ours (max_pixels), not Pillow's.
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(path) as im:
            fmt = PIL_FORMATS.get(im.format or "")
            if fmt is None:
                raise RejectError(f"unsupported image format {im.format}")
            width, height = im.size
    except UnidentifiedImageError:
        # Not a format Pillow knows: a DICOM file without the preamble, or not an image at all.
        try:
            head = read_dicom_header(path)
        except RejectError:
            raise RejectError("not an image file (unrecognised format)") from None
        return HeaderInfo("dicom", int(head["rows"]), int(head["cols"]), head.get("patient_id"))
    finally:
        Image.MAX_IMAGE_PIXELS = limit
    return HeaderInfo(fmt, height, width, None)


def scan_one(args: tuple[str, ReadConfig]) -> tuple[HeaderInfo | None, str | None]:
    """Pool-friendly wrapper: ``(info, None)`` or ``(None, reason)``."""
    path, cfg = args
    if not os.access(path, os.R_OK):
        return None, "unreadable file (permission denied or missing)"
    try:
        return scan_header(path, cfg), None
    except RejectError as err:
        return None, str(err)
