"""DICOM reading: synthetic files written with pydicom, and the real radiographs in ../shared/data/dicom."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_modality_lut, pixel_array
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from radstream.ingest.dicom import read_dicom_header
from radstream.ingest.errors import RejectError
from radstream.ingest.readers import ReadConfig, read_image
from tests.conftest import SHARED_DATA

REAL_DIR = SHARED_DATA / "dicom"
# Rows x columns, from the data README.
REAL_SIZES = {
    "CR-MONO1-10-chest.dcm": (440, 440),
    "CR-ModalitySequenceLUT.dcm": (1576, 1976),
    "GH133.dcm": (3062, 2394),
    "OutOfBoundsOverlay.dcm": (788, 1318),
    "RG1_J2KI.dcm": (1955, 1841),
    "RG3_J2KI.dcm": (1760, 1760),
    "RG3_J2KR.dcm": (1760, 1760),
}


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    return (arr - arr.min()) / (arr.max() - arr.min())


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _pattern(rows: int = 32, cols: int = 40, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 4096, (rows, cols), dtype=np.uint16)


def _write_dicom(
    path: Path,
    frames: np.ndarray | None,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    with_meta: bool = True,
    **elements,
) -> Path:
    """A minimal single- or multi-frame grayscale image; ``frames`` is [rows, cols] or [n, rows, cols]."""
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.PatientID = "P-042"
    ds.Modality = "CR"
    if frames is not None:
        signed = frames.dtype.kind == "i"
        ds.Rows, ds.Columns = frames.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = frames.dtype.itemsize * 8
        ds.BitsStored = bits_stored
        ds.HighBit = bits_stored - 1
        ds.PixelRepresentation = int(signed)
        if frames.ndim == 3:
            ds.NumberOfFrames = frames.shape[0]
        ds.PixelData = frames.astype(frames.dtype.newbyteorder("<")).tobytes()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    if with_meta:
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.save_as(path, enforce_file_format=True)
    else:
        ds.save_as(path, implicit_vr=True, little_endian=True)  # bare data set: no preamble, no file meta
    return path


def test_monochrome2_roundtrip_and_meta(tmp_path):
    arr = _pattern()
    img = read_image(_write_dicom(tmp_path / "a.dcm", arr))
    np.testing.assert_allclose(img.pixels, _minmax(arr), atol=1e-6)
    assert img.pixels.dtype == np.float32
    assert img.meta == {
        "format": "dicom",
        "height": 32,
        "width": 40,
        "bits": 12,
        "photometric": "MONOCHROME2",
        "patient_id": "P-042",
        "frames": 1,
        "pixel_sha1": img.meta["pixel_sha1"],
    }


def test_monochrome1_inverted(tmp_path):
    arr = np.full((32, 32), 2000, dtype=np.uint16)  # soft tissue
    arr[8:24, 8:24] = 300  # bone: low stored values are bright in MONOCHROME1
    arr[:, :4] = 4000  # air
    img = read_image(_write_dicom(tmp_path / "m1.dcm", arr, photometric="MONOCHROME1"))
    assert img.meta["photometric"] == "MONOCHROME1"
    np.testing.assert_allclose(img.pixels, 1.0 - _minmax(arr), atol=1e-6)
    assert img.pixels[16, 16] == 1.0 and img.pixels[0, 0] == 0.0
    assert img.pixels[0, 10] == pytest.approx(2000 / 3700, abs=1e-6)


def test_rescale_applied_before_window(tmp_path):
    # Stored 924..1124 with intercept -1024 is -100..100 HU; a window of 0 +- 100 HU spans exactly that range.
    arr = np.linspace(924, 1124, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = _write_dicom(
        tmp_path / "ct.dcm",
        arr,
        RescaleSlope=1,
        RescaleIntercept=-1024,
        WindowCenter=0,
        WindowWidth=200,
    )
    windowed = read_image(path, ReadConfig(apply_voi_lut=True))
    np.testing.assert_allclose(windowed.pixels, _minmax(arr), atol=0.01)
    # The same window on the stored values (rescale skipped) would saturate every pixel.
    no_rescale = _write_dicom(tmp_path / "raw.dcm", arr, WindowCenter=0, WindowWidth=200)
    with pytest.raises(RejectError, match="constant image"):
        read_image(no_rescale, ReadConfig(apply_voi_lut=True))


def test_window_clips_when_asked(tmp_path):
    arr = np.linspace(0, 4000, 32 * 32).reshape(32, 32).astype(np.uint16)
    path = _write_dicom(tmp_path / "w.dcm", arr, WindowCenter=2000, WindowWidth=1000)
    plain = read_image(path)
    windowed = read_image(path, ReadConfig(apply_voi_lut=True))
    np.testing.assert_allclose(plain.pixels, _minmax(arr), atol=1e-6)
    assert (windowed.pixels == 0).mean() > 0.3 and (windowed.pixels == 1).mean() > 0.3


def test_negative_rescale_slope_flips(tmp_path):
    arr = _pattern()
    img = read_image(_write_dicom(tmp_path / "neg.dcm", arr, RescaleSlope=-2, RescaleIntercept=5))
    np.testing.assert_allclose(img.pixels, 1.0 - _minmax(arr), atol=1e-6)


def test_modality_lut_sequence_used(tmp_path):
    arr = _pattern().astype(np.uint16)
    lut = (np.sqrt(np.arange(4096)) * 1000).astype(np.uint16)  # non-linear
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    item.add_new("LUTData", "OW", lut.astype("<u2").tobytes())
    img = read_image(_write_dicom(tmp_path / "lut.dcm", arr, ModalityLUTSequence=[item]))
    np.testing.assert_allclose(img.pixels, _minmax(lut[arr]), atol=1e-6)
    assert np.abs(img.pixels - _minmax(arr)).max() > 0.1


def test_bits_stored_masks_garbage_high_bits(tmp_path):
    arr = _pattern()  # 12-bit values
    garbage = np.random.default_rng(1).integers(0, 16, arr.shape, dtype=np.uint16) << 12
    dirty = read_image(_write_dicom(tmp_path / "dirty.dcm", arr | garbage, bits_stored=12))
    clean = read_image(_write_dicom(tmp_path / "clean.dcm", arr, bits_stored=12))
    np.testing.assert_allclose(dirty.pixels, _minmax(arr), atol=1e-6)
    assert dirty.meta["pixel_sha1"] == clean.meta["pixel_sha1"]


def test_signed_pixels(tmp_path):
    arr = np.random.default_rng(2).integers(-2048, 2048, (32, 32), dtype=np.int16)
    img = read_image(_write_dicom(tmp_path / "signed.dcm", arr, bits_stored=12))
    np.testing.assert_allclose(img.pixels, _minmax(arr), atol=1e-6)


def test_multiframe_uses_first_frame(tmp_path):
    frames = np.stack([_pattern(seed=s) for s in range(3)])
    img = read_image(_write_dicom(tmp_path / "mf.dcm", frames))
    assert img.meta["frames"] == 3
    assert img.pixels.shape == (32, 40)
    np.testing.assert_allclose(img.pixels, _minmax(frames[0]), atol=1e-6)


def test_rgb_converted_to_luminance(tmp_path):
    rgb = np.zeros((20, 30, 3), dtype=np.uint8)
    rgb[:, 10:20, 0] = 255  # red; black on the left, white on the right
    rgb[:, 20:] = 255
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 20, 30, 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = rgb.tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.save_as(tmp_path / "rgb.dcm", enforce_file_format=True)
    img = read_image(tmp_path / "rgb.dcm")
    assert img.meta["photometric"] == "RGB->L"
    np.testing.assert_allclose(img.pixels[0, [0, 10, 20]], [0.0, 0.299, 1.0], atol=1e-6)


def test_no_pixel_data_rejected(tmp_path):
    with pytest.raises(RejectError, match="DICOM has no pixel data"):
        read_image(_write_dicom(tmp_path / "sr.dcm", None))


def test_file_without_meta_header_decodes(tmp_path):
    arr = _pattern()
    path = _write_dicom(tmp_path / "bare.dcm", arr, photometric="MONOCHROME1", with_meta=False)
    assert path.read_bytes()[128:132] != b"DICM"
    img = read_image(path)
    np.testing.assert_allclose(img.pixels, 1.0 - _minmax(arr), atol=1e-6)
    assert img.meta["patient_id"] == "P-042"


def test_preamble_holding_a_tiff_header_is_still_dicom(tmp_path):
    path = _write_dicom(tmp_path / "dual.dcm", _pattern())
    data = bytearray(path.read_bytes())
    data[:4] = b"II*\x00"  # dual-personality files put a TIFF header in the 128-byte preamble
    path.write_bytes(bytes(data))
    assert read_image(path).meta["format"] == "dicom"


def test_truncated_pixel_data_rejected(tmp_path):
    data = _write_dicom(tmp_path / "full.dcm", _pattern()).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:-100])
    with pytest.raises(RejectError, match="DICOM"):
        read_image(path)


def test_too_large_rejected_before_decoding(tmp_path):
    path = _write_dicom(tmp_path / "big.dcm", _pattern(64, 64))
    with pytest.raises(RejectError, match="too large: 64x64"):
        read_image(path, ReadConfig(max_pixels=4000))


def test_header(tmp_path):
    path = _write_dicom(tmp_path / "h.dcm", _pattern(), photometric="MONOCHROME1", bits_stored=12)
    header = read_dicom_header(path)
    assert {k: header[k] for k in ("patient_id", "rows", "cols", "bits", "photometric")} == {
        "patient_id": "P-042",
        "rows": 32,
        "cols": 40,
        "bits": 12,
        "photometric": "MONOCHROME1",
    }


def test_header_of_non_dicom_rejected(tmp_path):
    path = tmp_path / "x.dcm"
    path.write_text("hello, not DICOM at all\n")
    with pytest.raises(RejectError, match="not a DICOM file"):
        read_dicom_header(path)


# --- real files -------------------------------------------------------------------------------------------

needs_real = pytest.mark.skipif(not REAL_DIR.is_dir(), reason=f"real DICOM test data not found at {REAL_DIR}")


def _reference_values(path: Path) -> np.ndarray:
    """pydicom's own reading: modality LUT applied to the decoded pixels, before any inversion."""
    ds = pydicom.dcmread(path, force=True)
    if not ds.file_meta.get("TransferSyntaxUID"):
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    return apply_modality_lut(pixel_array(ds), ds)


@pytest.fixture(scope="module")
def real_images():
    """Every real file read once (the mammogram takes a while)."""
    return {name: read_image(REAL_DIR / name) for name in REAL_SIZES}


@needs_real
@pytest.mark.parametrize("name", sorted(REAL_SIZES))
def test_real_file_decodes(real_images, name):
    img = real_images[name]
    assert img.pixels.shape == REAL_SIZES[name]
    assert img.pixels.dtype == np.float32
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
    assert (img.meta["height"], img.meta["width"]) == REAL_SIZES[name]
    assert (
        img.meta["bits"] == pydicom.dcmread(REAL_DIR / name, force=True, stop_before_pixels=True).BitsStored
    )


@needs_real
@pytest.mark.parametrize("name", ["CR-MONO1-10-chest.dcm", "RG1_J2KI.dcm", "RG3_J2KR.dcm"])
def test_real_monochrome1_inverted(real_images, name):
    img = real_images[name]
    assert img.meta["photometric"] == "MONOCHROME1"
    assert _corr(img.pixels, 1.0 - _minmax(_reference_values(REAL_DIR / name))) > 0.99


@needs_real
def test_real_j2k_lossy_matches_lossless(real_images):
    assert _corr(real_images["RG3_J2KI.dcm"].pixels, real_images["RG3_J2KR.dcm"].pixels) > 0.99


@needs_real
def test_real_modality_lut_sequence_used(real_images):
    path = REAL_DIR / "CR-ModalitySequenceLUT.dcm"
    ds = pydicom.dcmread(path)
    assert "ModalityLUTSequence" in ds
    pixels = real_images["CR-ModalitySequenceLUT.dcm"].pixels
    np.testing.assert_allclose(pixels, 1.0 - _minmax(_reference_values(path)), atol=1e-5)
    # Its rescale (slope 1, intercept 0) alone would give the stored values: measurably different.
    assert np.abs(pixels - (1.0 - _minmax(pixel_array(ds)))).max() > 0.05


@needs_real
def test_real_file_without_meta_header_and_header_read():
    header = read_dicom_header(REAL_DIR / "CR-MONO1-10-chest.dcm")
    assert (header["rows"], header["cols"], header["bits"]) == (440, 440, 10)
    assert header["photometric"] == "MONOCHROME1"
