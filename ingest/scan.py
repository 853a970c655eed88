"""Cheap header-only scan of every input: size, format and patient id, before any pixel is decoded.

The build plans bins and splits from this scan, so it must stay fast (no pixel decoding) and must turn every
unusable file into a one-line reject rather than an exception.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from radstream.ingest.dicom import check_burned_in, one_line
from radstream.ingest.errors import RejectError
from radstream.ingest.readers import ReadConfig, pillow_size, read_dicom_header, sniff_format

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HeaderInfo:
    """What the scan learns about one input without decoding its pixels."""

    format: str
    height: int
    width: int
    patient_id: str | None


def scan_header(path: str | Path, cfg: ReadConfig) -> HeaderInfo:
    """Read the size and format of one image from its header.

    The format is told by the file's first bytes, as the reader tells it
    (:func:`radstream.ingest.readers.sniff_format`), so that the scan and the decode agree on what a file is.

    Raises:
        RejectError: unreadable or empty file, not an image, a malformed header, absurd dimensions or a side
            smaller than ``cfg.min_side``.
    """
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "dicom":
        head = read_dicom_header(path)
        check_burned_in(head, cfg.keep_burned_in)
        info = HeaderInfo("dicom", head["rows"], head["cols"], head["patient_id"])
    else:
        height, width = pillow_size(path, fmt)
        info = HeaderInfo(fmt, height, width, None)
    pixels = info.height * info.width
    if pixels > cfg.max_pixels:
        raise RejectError(
            f"absurd dimensions {info.height}x{info.width} ({pixels} pixels > max_pixels {cfg.max_pixels})"
        )
    if min(info.height, info.width) < cfg.min_side:
        raise RejectError(f"image {info.height}x{info.width} is smaller than one patch ({cfg.min_side} px)")
    return info


def scan_one(args: tuple[str, ReadConfig]) -> tuple[HeaderInfo | None, str | None]:
    """Pool-friendly wrapper: ``(info, None)`` or ``(None, reason)``; never raises.

    Known bad input raises :class:`RejectError` with its reason. Anything else is a parser failure nobody
    anticipated: it is logged with its traceback and rejected naming the exception, because one strange file
    must not stop the scan of a million.
    """
    path, cfg = args
    if not os.access(path, os.R_OK):
        return None, "unreadable file (permission denied or missing)"
    try:
        return scan_header(path, cfg), None
    except RejectError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - the per-file boundary, see the docstring
        log.warning("%s: unexpected failure while scanning", path, exc_info=True)
        return None, f"unexpected {type(err).__name__} while scanning: {one_line(err)}"
