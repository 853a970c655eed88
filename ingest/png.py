"""PNG image data that ends early: the one truncation Pillow does not report.

Pillow stops decoding a PNG where its compressed stream ends and leaves the rows it never received black,
without an error (the check in its decoder is commented out). A file cut inside the stream is reported ("image
file is truncated"), but a file whose stream is complete and short (a writer that closed it early, a file cut
and then "repaired") is read as an image with a black bottom. :func:`check_complete` compares the length of
the decompressed stream with what the header promises.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from radstream.ingest.errors import RejectError

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
"""Colour type → samples per pixel."""
_ADAM7 = ((0, 0, 8, 8), (0, 4, 8, 8), (4, 0, 8, 4), (0, 2, 4, 4), (2, 0, 4, 2), (0, 1, 2, 2), (1, 0, 2, 1))
"""The seven passes of an interlaced PNG: first row, first column, row step, column step."""
_INFLATE_BLOCK = 1 << 20


def may_be_short(im: Image.Image) -> bool:
    """Whether a decoded PNG could be missing rows: the last row it writes is all zeros.

    Pillow's image memory starts zeroed and the rows come in order, so an image whose stream ended early has
    a blank last row: the last row of the image, or for an interlaced one the last odd row (only the final
    pass writes odd rows). A radiograph with a black border also passes here and gets the full check.
    """
    rows = {im.height - 1, im.height - 1 - (im.height - 1) % 2}
    return any(not np.asarray(im.crop((0, y, im.width, y + 1))).any() for y in rows if y >= 0)


def stream_bytes(width: int, height: int, bit_depth: int, colour_type: int, interlaced: bool) -> int:
    """Bytes of decompressed image data a header promises: per row, a filter byte and the packed samples."""
    bits = bit_depth * _SAMPLES[colour_type]

    def block(cols: int, rows: int) -> int:
        return rows * (1 + (cols * bits + 7) // 8) if cols > 0 and rows > 0 else 0

    if not interlaced:
        return block(width, height)
    return sum(block(-(-(width - x0) // dx), -(-(height - y0) // dy)) for y0, x0, dy, dx in _ADAM7)


def _chunks(path: Path):
    """``(type, data)`` of each chunk, in order, stopping at IEND or where the file ends."""
    with open(path, "rb") as f:
        if f.read(8) != _SIGNATURE:
            raise RejectError("cannot decode PNG: not a PNG signature")
        while len(head := f.read(8)) == 8:
            length, kind = struct.unpack(">I4s", head)
            data = f.read(length)
            f.seek(4, 1)  # the CRC: Pillow has checked it
            yield kind, data
            if kind == b"IEND":
                return


def check_complete(path: Path) -> None:
    """Reject a PNG whose image data holds fewer bytes than its header promises.

    Raises:
        RejectError: "image data ends early (N of M bytes)", or the stream cannot be inflated.
    """
    chunks = _chunks(path)
    kind, ihdr = next(chunks, (b"", b""))
    if kind != b"IHDR" or len(ihdr) != 13:
        raise RejectError("cannot decode PNG: no valid IHDR chunk")
    width, height, bit_depth, colour_type, _, _, interlace = struct.unpack(">IIBBBBB", ihdr)
    if colour_type not in _SAMPLES:
        raise RejectError(f"cannot decode PNG: unknown colour type {colour_type}")
    expected = stream_bytes(width, height, bit_depth, colour_type, interlace == 1)
    inflate = zlib.decompressobj()
    got = 0
    try:
        for kind, data in chunks:
            while kind == b"IDAT" and data and got < expected:
                got += len(inflate.decompress(data, _INFLATE_BLOCK))
                data = inflate.unconsumed_tail
            if got >= expected:
                return
    except zlib.error as err:
        raise RejectError(f"cannot decode PNG: {err}") from None
    raise RejectError(f"cannot decode PNG: image data ends early ({got} of {expected} bytes)")
