"""File writers of the synthetic radiograph corpus (``radstream.ingest.synth``): a drawn image → PNG or DICOM bytes.

Quantisation to the stored values (bit depth, sub-range, shift, MONOCHROME1 inversion), a fast deterministic
grayscale PNG encoder and an uncompressed DICOM writer whose UIDs derive from the corpus seed.
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

if TYPE_CHECKING:  # radstream.ingest.synth imports this module: the spec type is only needed for annotations
    from radstream.ingest.synth_plan import ImageSpec

SYNTH_VERSION = 1
"""Bumped whenever the same parameters would give different files."""


def encode_png(pixels: np.ndarray) -> bytes:
    """A grayscale PNG (uint8 → 8-bit, uint16 → 16-bit) with zlib level 1.

    Written by hand because Pillow tries all five PNG filters on every row, which makes it 3x slower on
    detector-sized images; here every row uses the Sub filter and zlib's RLE strategy (level 1), which is as
    small and deterministic.
    """
    h, w = pixels.shape
    depth = pixels.dtype.itemsize * 8
    rows = pixels.astype(">u2").view(np.uint8) if depth == 16 else np.ascontiguousarray(pixels, np.uint8)
    step = depth // 8
    filtered = np.empty((h, w * step + 1), np.uint8)
    filtered[:, 0] = 1  # filter type Sub: each byte minus the same byte of the pixel to its left (mod 256)
    filtered[:, 1 : 1 + step] = rows[:, :step]
    np.subtract(rows[:, step:], rows[:, :-step], out=filtered[:, 1 + step :])
    comp = zlib.compressobj(1, zlib.DEFLATED, 15, 9, zlib.Z_RLE)
    idat = comp.compress(filtered) + comp.flush()

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(data, zlib.crc32(tag)))
        )

    header = struct.pack(">IIBBBBB", w, h, depth, 0, 0, 0, 0)  # grayscale, deflate, no interlace
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def stored_values(spec: ImageSpec, img: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Quantise a [0, 1] image as the file stores it: bit depth, used sub-range, shift, MONOCHROME1 inversion.

    8-bit PNGs span 0..255 (a display export); 12/16-bit data span a random part of the detector range, as
    raw data do (the margins stay the minimum, so min-max normalisation maps them back to 0).
    """
    if spec.bits_stored == 8:
        img *= 255.0
        img += 0.5
        return img.astype(np.uint8)
    full = (1 << spec.bits_stored) - 1
    low, high = rng.uniform(0.0, 0.1) * full, rng.uniform(0.75, 1.0) * full
    img *= high - low
    img += low + 0.5
    values = img.astype(np.uint16)
    if spec.photometric == "MONOCHROME1":  # stored inverted: a correct reader inverts it back
        np.subtract(full, values, out=values)
    return values << spec.shift if spec.shift else values


_SOP_CLASSES = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "DX": "1.2.840.10008.5.1.4.1.1.1.1",
    "MG": "1.2.840.10008.5.1.4.1.1.1.2",
}
_BODY_PARTS = {
    "whole_body": "WHOLEBODY",
    "cranium": "SKULL",
    "spine": "SPINE",
    "upper_extremity": "ARM",
    "chest": "CHEST",
    "breast": "BREAST",
    "abdomen": "ABDOMEN",
    "pelvis": "PELVIS",
    "lower_extremity": "LEG",
}


def dicom_bytes(spec: ImageSpec, values: np.ndarray, seed: int) -> bytes:
    """An uncompressed Explicit VR Little Endian DICOM file; UIDs derived from the seed, no dates or times."""

    def uid(*parts: object) -> str:
        return generate_uid(entropy_srcs=["radstream-synth", str(seed), *map(str, parts)])

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = _SOP_CLASSES[spec.modality]
    meta.MediaStorageSOPInstanceUID = uid("image", spec.index)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationVersionName = f"RADSTREAM_SYNTH{SYNTH_VERSION}"  # not pydicom's: bytes stay put
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid("study", spec.patient_id)
    ds.SeriesInstanceUID = uid("series", spec.index)
    ds.PatientID, ds.PatientName = spec.patient_id, f"SYNTH^{spec.patient_id}"
    ds.Modality, ds.BodyPartExamined = spec.modality, _BODY_PARTS[spec.region]
    ds.InstanceNumber = spec.k + 1
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, spec.photometric
    ds.BitsAllocated, ds.PixelRepresentation = 16, 0
    ds.BitsStored, ds.HighBit = spec.bits_stored, spec.bits_stored - 1
    if spec.rescale is not None:
        slope, intercept = spec.rescale
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = f"{slope:g}", f"{intercept:g}", "US"
    ds.add_new(0x7FE00010, "OW", values.astype("<u2").tobytes())
    buf = io.BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
