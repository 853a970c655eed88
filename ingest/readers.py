"""Read one image file (DICOM, PNG, JPEG, TIFF) into a normalised float grayscale array.

The format is told by the file's first bytes, never by its extension. Every way a file can fail (missing,
unreadable, unknown format, truncated, too large, too small, constant, undecodable) ends in a ``RejectError``
with a one-line reason; the caller adds the path.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image, ImageFile, ImageOps

from radstream.ingest import dicom, png
from radstream.ingest.dicom import read_dicom_header
from radstream.ingest.errors import RejectError
from radstream.ingest.normalize import Grayscale, foreground_box_of, luminance, minmax_bounds, scale_to_unit

__all__ = [
    "DecodedImage",
    "LoadedImage",
    "ReadConfig",
    "decode_image",
    "pillow_size",
    "read_dicom_header",
    "read_image",
    "sniff_format",
]

_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpeg"),
    (b"II*\x00", "tiff"),
    (b"MM\x00*", "tiff"),
    (b"II+\x00", "tiff"),  # BigTIFF
    (b"MM\x00+", "tiff"),
)
_PIL_FORMAT = {"png": "PNG", "jpeg": "JPEG", "tiff": "TIFF"}
# What Pillow raises on a malformed or truncated file (DecompressionBombError is handled on its own).
_PIL_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error)
_GRAY_MODES = {"1", "L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
_MODE_BITS = {"1": 1, "I": 32, "F": 32, "I;16": 16, "I;16L": 16, "I;16B": 16, "I;16N": 16}
_TIFF_BITS_PER_SAMPLE = 258
# Modes Pillow exports through Arrow as one flat array, with the numpy dtype of their pixels (Arrow calls
# "I;16" int16: the bits are the same).
_ARROW_DTYPES = {"L": np.uint8, "I;16": np.uint16, "I": np.int32, "F": np.float32}


@dataclass(frozen=True)
class ReadConfig:
    """How files are read and normalised (part of the ingest stage config)."""

    percentile_low: float = 0.0
    """Values below this percentile are clipped before min-max; 0 with 100 is plain min-max (the study)."""
    percentile_high: float = 100.0
    """Values above this percentile are clipped before min-max."""
    apply_voi_lut: bool = False
    """DICOM: apply the VOI LUT Sequence or Window Centre / Width (first view) when the file has one."""
    foreground_tolerance: float = 0.02
    """A border row or column is uniform, and stripped from the foreground box, when its value range in the
    normalised image is at most this."""
    max_pixels: int = 100_000_000
    """Images with more pixels (height x width, from the header, before decoding) are rejected as
    decompression bombs. Pillow refuses more than twice ``PIL.Image.MAX_IMAGE_PIXELS`` (~179 M) by itself."""
    min_side: int = 16
    """Images with a side shorter than this (one patch) are rejected."""
    keep_burned_in: bool = False
    """DICOM whose BurnedInAnnotation says YES (text such as a name burned into the pixels) are rejected unless
    this is true, for archives known to be clean."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.percentile_low < self.percentile_high <= 100.0:
            raise ValueError(
                f"need 0 <= percentile_low < percentile_high <= 100, got {self.percentile_low}, "
                f"{self.percentile_high}"
            )
        if not 0.0 <= self.foreground_tolerance <= 1.0:
            raise ValueError(f"foreground_tolerance must be in [0, 1], got {self.foreground_tolerance}")
        if self.min_side < 1:
            raise ValueError(f"min_side must be >= 1, got {self.min_side}")
        if self.max_pixels < self.min_side**2:
            raise ValueError(f"max_pixels must be >= min_side**2, got {self.max_pixels}")


@dataclass
class LoadedImage:
    """One decoded, normalised image."""

    pixels: np.ndarray
    """float32 ``[H, W]`` in [0, 1]: min-max normalised (after the optional percentile clip)."""
    foreground: tuple[int, int, int, int]
    """``(y0, x0, y1, x1)``, half-open, in source pixels: the image without uniform borders."""
    meta: dict
    """format ("dicom" | "png" | "jpeg" | "tiff"), height, width, bits (stored bits / bit depth), photometric
    ("MONOCHROME1", "MONOCHROME2", or "<colour model>->L" for colour turned into luminance), patient_id (DICOM
    PatientID or None), frames (frames or pages in the file; only the first is read), pixel_sha1 (see
    :func:`pixel_sha1`)."""


@dataclass
class DecodedImage:
    """One decoded image with its normalisation worked out but not applied.

    ``scale_to_unit(values, zero, one)`` is the normalised image of :class:`LoadedImage`. Keeping the stored
    numbers lets a caller shrink the image first (in its integer mode) and normalise only the small copy,
    which gives the same result up to rounding because the map is linear.
    """

    values: np.ndarray
    """``[H, W]`` stored numbers (integers where the file holds integers) or computed grayscale, any real
    dtype."""
    zero: float
    """The value of ``values`` that normalises to 0 (larger than ``one`` for inverted data: MONOCHROME1)."""
    one: float
    """The value of ``values`` that normalises to 1."""
    meta: dict
    """As :attr:`LoadedImage.meta`."""
    may_clip: bool = True
    """Whether ``zero`` and ``one`` may lie inside the value range (percentile bounds), so that normalising
    clips; when False they are the plain min and max and the map to [0, 1] is linear on this image."""

    def normalized(self) -> np.ndarray:
        """float32 ``[H, W]`` in [0, 1]: the min-max normalised image."""
        return scale_to_unit(self.values, self.zero, self.one)

    def foreground_box(self, tolerance: float) -> tuple[int, int, int, int]:
        """``(y0, x0, y1, x1)``: the foreground box of :meth:`normalized`, computed on the stored numbers."""
        return foreground_box_of(self.values, self.zero, self.one, tolerance)


def sniff_format(path: Path) -> str:
    """The file's format from its first bytes: "dicom", "png", "jpeg" or "tiff".

    Raises:
        RejectError: the file cannot be opened or read, is empty, or is none of these formats.
    """
    try:
        with path.open("rb") as f:
            head = f.read(132)
    except OSError as err:
        raise RejectError(f"cannot read file: {err.strerror or dicom.one_line(err)}") from err
    if not head:
        raise RejectError("empty file (0 bytes)")
    if head[128:132] == b"DICM":  # first: a DICOM preamble may itself hold a TIFF header
        return "dicom"
    for magic, fmt in _MAGIC:
        if head.startswith(magic):
            return fmt
    if dicom.looks_like_dicom(head):
        return "dicom"
    raise RejectError("not an image file (unrecognised format)")


def check_size(height: int, width: int, cfg: ReadConfig) -> None:
    """Reject images too large to decode safely or too small for one patch (dimensions from the header)."""
    if height * width > cfg.max_pixels:
        raise RejectError(
            f"image too large: {height}x{width} = {height * width} pixels > max_pixels {cfg.max_pixels} "
            "(decompression bomb guard)"
        )
    if min(height, width) < cfg.min_side:
        raise RejectError(f"image too small: {height}x{width}, a side is under min_side {cfg.min_side}")


def pixel_sha1(raw: np.ndarray) -> str:
    """Hex sha1 of a decoded pixel array's bytes (little endian, C order), shape and dtype: the duplicate key."""
    arr = np.ascontiguousarray(raw, dtype=raw.dtype.newbyteorder("<"))
    digest = hashlib.sha1(memoryview(arr).cast("B"))  # hashes the buffer in place, no copy
    digest.update(f"{arr.shape}{arr.dtype.str}".encode())
    return digest.hexdigest()


def _read_dicom(path: Path, cfg: ReadConfig) -> tuple[np.ndarray, Grayscale, dict]:
    """Raw pixels, grayscale values and meta of a DICOM file."""
    ds = dicom.open_dicom(path)
    header = dicom.header_fields(ds)
    dicom.check_burned_in(header, cfg.keep_burned_in)
    if not dicom.has_pixel_data(ds):
        raise RejectError("DICOM has no pixel data")
    if not header["rows"] or not header["cols"]:
        raise RejectError("DICOM has pixel data but no Rows / Columns")
    check_size(header["rows"], header["cols"], cfg)
    raw, gray = dicom.decode_dicom(ds, apply_voi=cfg.apply_voi_lut)
    photometric = header["photometric"]
    if raw.ndim == 3 or photometric == "PALETTE COLOR":
        photometric = f"{photometric}->L"
    meta = {
        "format": "dicom",
        "height": gray.values.shape[0],
        "width": gray.values.shape[1],
        "bits": header["bits"],
        "photometric": photometric,
        "patient_id": header["patient_id"],
        "frames": header["frames"],
    }
    return raw, gray, meta


def _pixel_array(im: Image.Image) -> np.ndarray:
    """A loaded image's pixels as a read-only array, sharing Pillow's memory where Pillow allows it.

    ``np.asarray`` copies an image through ``tobytes`` (in chunks, then joined), which for a large radiograph
    costs as much as everything the shard build does after decoding. Pillow (11.2 and later) exports an image
    held in one memory block through the Arrow C data interface, and pyarrow turns that into a numpy view of
    the same memory, kept alive by the view. Other modes, and images too large for one block (16 MiB by
    default), are copied.
    """
    dtype = _ARROW_DTYPES.get(im.mode)
    if dtype is not None and hasattr(im, "__arrow_c_array__"):
        try:
            flat = pa.array(im).to_numpy(zero_copy_only=True)
        except ValueError:  # Pillow: "rows are not contiguous in memory" (several blocks)
            return np.asarray(im)
        return flat.view(dtype).reshape(im.height, im.width)
    return np.asarray(im)


def _pillow_arrays(im: Image.Image) -> tuple[np.ndarray, np.ndarray, str]:
    """Raw pixels, grayscale values and photometric of a loaded Pillow image."""
    if im.mode in _GRAY_MODES:
        raw = _pixel_array(im)
        return raw, raw.astype(np.uint8) if raw.dtype == bool else raw, "MONOCHROME2"
    if im.mode == "LA":
        raw = np.asarray(im.getchannel("L"))
        return raw, raw, "MONOCHROME2"
    rgb = im if im.mode in ("RGB", "RGBA") else im.convert("RGB")
    raw = np.asarray(rgb)
    return raw, luminance(raw), "RGB->L"


def _pillow_bits(im: Image.Image, fmt: str) -> int:
    """Bit depth per sample: the TIFF BitsPerSample tag when there is one, else what the mode holds."""
    if fmt == "tiff":
        bits = im.tag_v2.get(_TIFF_BITS_PER_SAMPLE)
        if bits:
            return int(bits[0] if isinstance(bits, tuple) else bits)
    return _MODE_BITS.get(im.mode, 8)


def pillow_size(path: Path, fmt: str) -> tuple[int, int]:
    """``(height, width)`` of a PNG, JPEG or TIFF from its header; no pixel is decoded.

    Pillow's own decompression-bomb check is off: the caller applies ``max_pixels`` and says so.

    Raises:
        RejectError: Pillow cannot parse the header.
    """
    try:
        with _strict_pillow(bomb_check=False), Image.open(path, formats=[_PIL_FORMAT[fmt]]) as im:
            width, height = im.size
    except _PIL_ERRORS as err:
        raise RejectError(f"cannot read {fmt.upper()}: {dicom.one_line(err)}") from err
    return height, width


@contextmanager
def _strict_pillow(bomb_check: bool = True) -> Iterator[None]:
    """Pillow set to fail on a truncated file, whatever another library in this process has switched on.

    With ``ImageFile.LOAD_TRUNCATED_IMAGES`` (one setting for the whole process) Pillow accepts a truncated
    header and fills the missing part of a truncated image. ``bomb_check=False`` turns Pillow's own
    decompression-bomb limit off where the caller applies ``max_pixels``.
    """
    truncated, limit = ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    if not bomb_check:
        Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS = truncated, limit


def _read_pillow(path: Path, fmt: str, cfg: ReadConfig) -> tuple[np.ndarray, Grayscale, dict]:
    """Raw pixels, grayscale values and meta of a PNG, JPEG or TIFF file (first frame / page)."""
    try:
        with _strict_pillow(), Image.open(path, formats=[_PIL_FORMAT[fmt]]) as im:
            width, height = im.size  # from the header; nothing decoded yet
            check_size(height, width, cfg)
            frames = getattr(im, "n_frames", 1)
            bits = _pillow_bits(im, fmt)
            im.load()
            if fmt == "png" and png.may_be_short(im):
                png.check_complete(path)
            ImageOps.exif_transpose(im, in_place=True)
            raw, values, photometric = _pillow_arrays(im)
    except Image.DecompressionBombError as err:
        raise RejectError(f"image too large (decompression bomb): {dicom.one_line(err)}") from err
    except _PIL_ERRORS as err:
        raise RejectError(f"cannot decode {fmt.upper()}: {dicom.one_line(err)}") from err
    meta = {
        "format": fmt,
        "height": values.shape[0],
        "width": values.shape[1],
        "bits": bits,
        "photometric": photometric,
        "patient_id": None,
        "frames": frames,
    }
    return raw, Grayscale(values), meta


def decode_image(path: str | Path, cfg: ReadConfig = ReadConfig()) -> DecodedImage:
    """Decode one image file and work out its normalisation, without making the normalised image.

    Everything :func:`read_image` does (format detection, checks, DICOM pipeline, duplicate key, rejections)
    except applying the map to [0, 1] and finding the foreground box: see :class:`DecodedImage`.

    Raises:
        RejectError: the file cannot be used; ``str(err)`` is the one-line reason.
    """
    path = Path(path)
    fmt = sniff_format(path)
    if fmt == "dicom":
        raw, gray, meta = _read_dicom(path, cfg)
    else:
        raw, gray, meta = _read_pillow(path, fmt, cfg)
    zero, one = minmax_bounds(
        gray.values, cfg.percentile_low, cfg.percentile_high, slope=gray.slope, intercept=gray.intercept
    )
    meta["pixel_sha1"] = pixel_sha1(raw)
    may_clip = cfg.percentile_low > 0 or cfg.percentile_high < 100
    return DecodedImage(gray.values, zero, one, meta, may_clip)


def read_image(path: str | Path, cfg: ReadConfig = ReadConfig()) -> LoadedImage:
    """Read one image file into a normalised float32 grayscale image.

    DICOM goes through :mod:`radstream.ingest.dicom` (modality LUT, MONOCHROME1 inverted, Bits Stored, optional VOI;
    multi-frame: the first frame only, ``meta["frames"]`` says how many there were). PNG, JPEG and TIFF go
    through Pillow: 16-bit data keeps its 16 bits, colour becomes luminance (ITU-R BT.601), the EXIF
    orientation is applied, a multi-page TIFF gives its first page. Dimensions are checked from the header
    before anything is decoded.

    Args:
        path: the file; its format is told by its content.
        cfg: normalisation and limits.

    Returns:
        The normalised pixels, their foreground box and the metadata (see :class:`LoadedImage`).

    Raises:
        RejectError: the file cannot be used; ``str(err)`` is the one-line reason.
    """
    decoded = decode_image(path, cfg)
    return LoadedImage(decoded.normalized(), decoded.foreground_box(cfg.foreground_tolerance), decoded.meta)
