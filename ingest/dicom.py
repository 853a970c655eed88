"""DICOM specifics: detection, header, decoding of the first frame and the grayscale pipeline.

The pipeline, in the order the standard applies it (PS3.3 C.11 / C.7.6.3.1.2):

1. Decode the first frame of Pixel Data: native and RLE by pydicom, JPEG (baseline, extended, lossless) and
   JPEG 2000 by the pylibjpeg plugins; a transfer syntax no installed plugin decodes (JPEG-LS needs another
   one) is rejected with the decoder's message. Multi-frame objects: only frame 0 is used; the number of
   frames is reported so the caller can record it.
2. Bits Stored: for unsigned data the bits above Bits Stored are masked off (old files keep overlays or
   garbage there); signed data is sign-extended by pydicom.
3. Modality LUT: the Modality LUT Sequence when present, else Rescale Slope / Intercept.
4. Optionally the VOI LUT Sequence or Window Centre / Width (first view).
5. MONOCHROME1 is inverted so that bone, always attenuating, ends up bright as in MONOCHROME2.

Rescale Slope / Intercept and the inversion are linear, so they are returned as a slope and intercept with
the stored pixels (:class:`radstream.ingest.normalize.Grayscale`) rather than applied: min-max normalisation only needs
the slope's sign, and a full-size float64 copy of the image was the costliest step of reading it.

Colour objects (RGB, YBR_*, PALETTE COLOR) are turned into luminance instead of steps 3-5.
"""

from __future__ import annotations

import math
import struct
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, pixel_array
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from radstream.ingest.errors import RejectError
from radstream.ingest.normalize import Grayscale, luminance

# Groups a DICOM data set without preamble usually starts with: command/group-length, file meta, identifying.
_FIRST_GROUPS = {0x0000, 0x0002, 0x0008}
_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# What pydicom raises on a malformed or truncated file, while dcmread parses it or when an element is
# converted (lazily, on first access): an unknown VR (NotImplementedError), a value length that is no
# multiple of its VR's size (BytesLengthException), numbers or text that do not parse (ValueError, TypeError),
# values cut short (EOFError, struct.error, IndexError), a character set or tag it cannot look up (KeyError;
# IndexError and KeyError are both LookupError).
_READ_ERRORS = (
    InvalidDicomError,
    BytesLengthException,
    NotImplementedError,
    OSError,
    EOFError,
    ValueError,
    TypeError,
    LookupError,
    OverflowError,
    struct.error,
)
# What decoding and the LUT functions raise besides: missing required elements surface as AttributeError,
# decoder failures as RuntimeError, unsupported transfer syntaxes as NotImplementedError.
_DECODE_ERRORS = (AttributeError, RuntimeError, *_READ_ERRORS)


def looks_like_dicom(head: bytes) -> bool:
    """Whether a file's first 132 bytes look like DICOM.

    True for a Part 10 file (128-byte preamble, then ``b"DICM"``) and for a bare data set without preamble
    whose first tag (little endian) is in group 0000, 0002 or 0008.
    """
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8:
        return False
    group = int.from_bytes(head[:2], "little")
    return group in _FIRST_GROUPS


def _set_transfer_syntax(ds: Dataset) -> None:
    """Give a data set read without file meta the transfer syntax its body was found to be encoded in."""
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    implicit, little = ds.original_encoding
    if implicit is False:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    else:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian


def open_dicom(path: Path, *, stop_before_pixels: bool = False) -> Dataset:
    """Parse a DICOM file (Part 10 or a bare data set) without decoding its pixel data.

    Raises:
        RejectError: the file is not DICOM, or cannot be read or parsed.
    """
    try:
        with path.open("rb") as f:
            head = f.read(132)
            if not looks_like_dicom(head):
                raise RejectError("not a DICOM file")
            f.seek(0)
            ds = pydicom.dcmread(f, force=head[128:132] != b"DICM", stop_before_pixels=stop_before_pixels)
        _set_transfer_syntax(ds)
    except _READ_ERRORS as err:
        raise RejectError(f"unreadable DICOM: {one_line(err)}") from err
    return ds


def _element(ds: Dataset, keyword: str, default: object = None) -> object:
    """One element's value, or ``default`` when absent.

    pydicom converts an element's bytes when it is first read, so a malformed element fails here, not when
    the file is opened.

    Raises:
        RejectError: the element cannot be converted (its keyword and pydicom's message).
    """
    try:
        return ds.get(keyword, default)
    except _READ_ERRORS as err:
        raise RejectError(f"DICOM {keyword} cannot be read: {one_line(err)}") from None


def _whole_number(ds: Dataset, keyword: str) -> int:
    """A count or size element (Rows, NumberOfFrames, ...) as an int; 0 when absent or empty.

    Raises:
        RejectError: several values, or a value that is not a whole number.
    """
    value = _element(ds, keyword)
    if value is None or value == "":
        return 0
    if isinstance(value, MultiValue | list):
        raise RejectError(f"DICOM {keyword} holds {len(value)} values, expected one")
    try:
        number = float(value)  # IS text as well as US numbers: "2" and "2.0" are whole, "abc" and "2.5" not
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not number.is_integer() or number < 0:
        raise RejectError(f"DICOM {keyword} {value!r} is not a whole number")
    return int(number)


def _text(ds: Dataset, keyword: str) -> str | None:
    """A text element stripped, None when absent or empty."""
    return str(_element(ds, keyword, "") or "").strip() or None


def header_fields(ds: Dataset) -> dict:
    """The header facts the pipeline needs: patient_id, rows, cols, bits, photometric, frames, burned_in.

    Raises:
        RejectError: one of these elements is malformed (see :func:`_element`, :func:`_whole_number`).
    """
    return {
        "patient_id": _text(ds, "PatientID"),
        "rows": _whole_number(ds, "Rows"),
        "cols": _whole_number(ds, "Columns"),
        "bits": _whole_number(ds, "BitsStored") or _whole_number(ds, "BitsAllocated"),
        "photometric": _text(ds, "PhotometricInterpretation"),
        "frames": _whole_number(ds, "NumberOfFrames") or 1,
        "burned_in": (_text(ds, "BurnedInAnnotation") or "").upper() == "YES",
    }


def check_burned_in(header: dict, keep: bool) -> None:
    """Reject an image whose header says text is burned into its pixels (a name, a date), unless ``keep``.

    Raises:
        RejectError: BurnedInAnnotation is YES and not ``keep``.
    """
    if header.get("burned_in") and not keep:
        raise RejectError(
            "DICOM BurnedInAnnotation is YES: the pixels may show identifying text "
            "(ingest.read.keep_burned_in=true keeps such images)"
        )


def read_dicom_header(path: str | Path) -> dict:
    """Header-only read (pixel data is not even loaded): see :func:`header_fields` for the keys.

    Raises:
        RejectError: the file is not DICOM or cannot be parsed.
    """
    return header_fields(open_dicom(Path(path), stop_before_pixels=True))


def has_pixel_data(ds: Dataset) -> bool:
    """Whether the data set carries any kind of pixel data."""
    return any(keyword in ds for keyword in _PIXEL_KEYWORDS)


def _mask_unused_bits(arr: np.ndarray, ds: Dataset) -> np.ndarray:
    """Clear the bits above Bits Stored in unsigned integer data (a no-op where they are already clear)."""
    bits_stored = _whole_number(ds, "BitsStored")
    if arr.dtype.kind != "u" or not 0 < bits_stored < arr.dtype.itemsize * 8:
        return arr
    # Checking the maximum is a fraction of the cost of the masking copy, and almost every file is clean.
    if int(arr.max()) >> bits_stored == 0:
        return arr
    return arr & arr.dtype.type((1 << bits_stored) - 1)


def _rescale(ds: Dataset) -> tuple[float, float]:
    """Rescale Slope and Intercept, as pydicom's ``apply_modality_lut`` uses them (both present, else 1, 0)."""
    slope, intercept = _element(ds, "RescaleSlope"), _element(ds, "RescaleIntercept")
    if slope in (None, "") or intercept in (None, ""):  # absent or present but empty: no rescale
        return 1.0, 0.0
    try:
        return float(slope), float(intercept)
    except (TypeError, ValueError):
        raise RejectError(f"unreadable Rescale Slope/Intercept ({slope!r}, {intercept!r})") from None


def _grayscale(raw: np.ndarray, ds: Dataset, apply_voi: bool) -> Grayscale:
    """Modality LUT, optional VOI LUT, MONOCHROME1 inversion; see the module docstring.

    A rescale and the inversion are linear, so they stay unapplied (the slope and intercept of the result):
    only a LUT or a VOI transform is applied to the pixels themselves.
    """
    if apply_voi or ds.get("ModalityLUTSequence"):
        values = apply_modality_lut(raw, ds)
        if apply_voi:
            if ds.get("VOILUTSequence") and values.dtype.kind == "f":
                # A VOI LUT is indexed by integer values; a float modality output (rescale) is rounded first.
                values = np.rint(values).astype(np.int64)
            values = apply_voi_lut(values, ds, index=0)
        gray = Grayscale(values)
    else:
        gray = Grayscale(raw, *_rescale(ds))
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        gray = Grayscale(gray.values, -gray.slope, -gray.intercept)
    return gray


def decode_dicom(ds: Dataset, apply_voi: bool = False) -> tuple[np.ndarray, Grayscale]:
    """Decode the first frame and bring it to grayscale values where higher means brighter.

    Args:
        ds: a data set from :func:`open_dicom` that has pixel data (see :func:`has_pixel_data`), not yet
            decoded.
        apply_voi: apply the VOI LUT Sequence or Window Centre / Width when present.

    Returns:
        ``(raw, gray)``: the decoded stored pixels of frame 0 (high bits masked; colour as RGB) and the
        grayscale, ready for min-max normalisation (see :class:`radstream.ingest.normalize.Grayscale`).

    Raises:
        RejectError: the decoder or a LUT failed (its message is kept).
    """
    photometric = _element(ds, "PhotometricInterpretation")
    try:
        raw = _mask_unused_bits(pixel_array(ds, index=0), ds)
        if photometric == "PALETTE COLOR":
            return raw, Grayscale(luminance(apply_color_lut(raw, ds)))
        if raw.ndim == 3:
            return raw, Grayscale(luminance(raw))
        return raw, _grayscale(raw, ds, apply_voi)
    except _DECODE_ERRORS as err:
        raise RejectError(f"DICOM pixel data cannot be decoded: {one_line(err)}") from err


def one_line(err: BaseException) -> str:
    """An exception's message on one line (decoder messages can span several), for a RejectError."""
    return " ".join(str(err).split()) or type(err).__name__
