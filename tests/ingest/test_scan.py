"""The header scan: every hostile header is a one-line reject, and the scan agrees with the reader."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radstream.ingest import scan
from radstream.ingest.errors import RejectError
from radstream.ingest.readers import ReadConfig, decode_image
from radstream.ingest.scan import HeaderInfo, scan_header, scan_one
from tests.ingest.test_dicom import _write_dicom

CFG = ReadConfig()


def _pattern() -> np.ndarray:
    return (np.arange(32 * 32, dtype=np.uint16).reshape(32, 32) * 3) % 4096


def _patched_dicom(path: Path, old: bytes, new: bytes, **elements) -> Path:
    """A valid DICOM (explicit VR little endian) with the bytes of one element replaced."""
    _write_dicom(path, _pattern(), **elements)
    data = path.read_bytes()
    assert data.count(old) == 1, old
    path.write_bytes(data.replace(old, new))
    return path


def _both_reject(path: Path, match: str) -> None:
    """The scan and the decode reject the file with the same kind of one-line reason."""
    for read in (scan_header, decode_image):
        with pytest.raises(RejectError, match=match) as err:
            read(path, CFG)
        assert "\n" not in str(err.value)


def test_scan_reads_dicom_png_and_jpeg_headers(tmp_path):
    _write_dicom(tmp_path / "a.dcm", _pattern())
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.zeros((24, 36), np.uint8)).save(tmp_path / "c.dat", "JPEG")  # told by content
    assert scan_header(tmp_path / "a.dcm", CFG) == HeaderInfo("dicom", 32, 32, "P-042")
    assert scan_header(tmp_path / "b.png", CFG) == HeaderInfo("png", 20, 40, None)
    assert scan_header(tmp_path / "c.dat", CFG) == HeaderInfo("jpeg", 24, 36, None)


def test_rows_with_two_values(tmp_path):
    path = tmp_path / "rows.dcm"
    _write_dicom(path, _pattern(), Rows=[32, 32])
    _both_reject(path, r"^DICOM Rows holds 2 values, expected one$")


def test_number_of_frames_that_is_not_a_number(tmp_path):
    path = _patched_dicom(
        tmp_path / "frames.dcm",
        b"\x28\x00\x08\x00IS\x02\x001 ",
        b"\x28\x00\x08\x00IS\x04\x00abc ",
        NumberOfFrames=1,
    )
    _both_reject(path, r"^DICOM NumberOfFrames 'abc' is not a whole number$")


def test_unknown_value_representation(tmp_path):
    path = _patched_dicom(tmp_path / "vr.dcm", b"\x28\x00\x11\x00US", b"\x28\x00\x11\x00ZZ")
    _both_reject(path, r"^DICOM Columns cannot be read: Unknown Value Representation 'ZZ'")


def test_value_length_that_does_not_fit_its_type(tmp_path):
    # Rows is US (2 bytes a value); 3 bytes make pydicom raise BytesLengthException on first access.
    path = _patched_dicom(
        tmp_path / "len.dcm", b"\x28\x00\x10\x00US\x02\x00\x20\x00", b"\x28\x00\x10\x00US\x03\x00\x20\x00\x00"
    )
    _both_reject(path, r"^DICOM Rows cannot be read: Expected total bytes to be an even multiple")


def test_png_with_a_truncated_ihdr_chunk(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[11] = 12  # IHDR length 13 -> 12: Pillow raises ValueError("Truncated IHDR chunk")
    path = tmp_path / "ihdr.png"
    path.write_bytes(bytes(data))
    _both_reject(path, r"^cannot (read|decode) PNG: .*IHDR")


def test_empty_file_has_its_own_reason(tmp_path):
    path = tmp_path / "empty.dcm"
    path.touch()
    assert scan_one((str(path), CFG)) == (None, "empty file (0 bytes)")


def test_an_unexpected_scan_failure_is_a_reject_that_names_the_exception(tmp_path, monkeypatch, caplog):
    """A bug met on one file (here a monkeypatched TypeError) rejects that file; the scan goes on."""
    path = tmp_path / "a.png"
    Image.fromarray(np.zeros((20, 40), np.uint8)).save(path)

    def broken(path, cfg):
        raise TypeError("unsupported operand type(s) for *: 'NoneType' and 'int'")

    monkeypatch.setattr(scan, "scan_header", broken)
    with caplog.at_level(logging.WARNING, logger="radstream.ingest.scan"):
        info, reason = scan_one((str(path), CFG))
    assert info is None
    assert (
        reason
        == "unexpected TypeError while scanning: unsupported operand type(s) for *: 'NoneType' and 'int'"
    )
    assert any(r.exc_info for r in caplog.records), "the traceback is logged for the bug report"
