"""PNG / JPEG / TIFF reading, format sniffing and the rejections every reader shares."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radstream.ingest import png
from radstream.ingest.errors import RejectError
from radstream.ingest.readers import LoadedImage, ReadConfig, decode_image, read_image
from tests.ingest.test_dicom import _write_dicom


def _minmax(arr: np.ndarray) -> np.ndarray:
    arr = arr.astype(np.float64)
    return (arr - arr.min()) / (arr.max() - arr.min())


def _ramp(height: int, width: int, lo: int, hi: int, dtype) -> np.ndarray:
    return np.linspace(lo, hi, height * width).reshape(height, width).astype(dtype)


def _save(arr: np.ndarray, path: Path, **kwargs) -> Path:
    Image.fromarray(arr).save(path, **kwargs)
    return path


def _check_image(img: LoadedImage, fmt: str, shape: tuple[int, int]) -> None:
    assert img.pixels.dtype == np.float32
    assert img.pixels.shape == shape
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
    assert img.meta["format"] == fmt
    assert (img.meta["height"], img.meta["width"]) == shape
    assert img.meta["patient_id"] is None
    assert img.meta["frames"] == 1
    assert len(img.meta["pixel_sha1"]) == 40


def test_png_8bit_roundtrip(tmp_path):
    arr = _ramp(32, 48, 10, 250, np.uint8)
    img = read_image(_save(arr, tmp_path / "a.png"))
    _check_image(img, "png", (32, 48))
    assert img.meta["bits"] == 8 and img.meta["photometric"] == "MONOCHROME2"
    np.testing.assert_allclose(img.pixels, _minmax(arr), atol=1e-6)


def test_png_16bit_keeps_16_bits(tmp_path):
    arr = _ramp(40, 40, 1000, 61000, np.uint16)
    arr[0, :2] = [30000, 30001]  # one grey level apart: lost if the reader dropped to 8 bits
    img = read_image(_save(arr, tmp_path / "a.png"))
    _check_image(img, "png", (40, 40))
    assert img.meta["bits"] == 16
    np.testing.assert_allclose(img.pixels, _minmax(arr), atol=1e-6)
    assert img.pixels[0, 1] > img.pixels[0, 0]


def test_jpeg(tmp_path):
    yy, xx = np.mgrid[0:64, 0:64]
    arr = (xx * 2 + yy * 1.5 + 20).astype(np.uint8)  # smooth: survives JPEG closely
    img = read_image(_save(arr, tmp_path / "a.jpg", quality=95))
    _check_image(img, "jpeg", (64, 64))
    assert img.meta["bits"] == 8
    assert np.abs(img.pixels - _minmax(arr)).mean() < 0.01


def test_tiff_16bit(tmp_path):
    arr = _ramp(30, 50, 0, 65535, np.uint16)
    img = read_image(_save(arr, tmp_path / "a.tif"))
    _check_image(img, "tiff", (30, 50))
    assert img.meta["bits"] == 16
    np.testing.assert_allclose(img.pixels, _minmax(arr), atol=1e-6)


def test_multipage_tiff_reads_first_page(tmp_path):
    first = _ramp(20, 20, 0, 200, np.uint8)
    second = first[::-1].copy()
    path = tmp_path / "pages.tif"
    Image.fromarray(first).save(path, save_all=True, append_images=[Image.fromarray(second)])
    img = read_image(path)
    assert img.meta["frames"] == 2
    np.testing.assert_allclose(img.pixels, _minmax(first), atol=1e-6)


def test_colour_converted_to_luminance(tmp_path):
    rgb = np.zeros((20, 40, 3), dtype=np.uint8)
    rgb[:, 10:20, 0] = 255  # red
    rgb[:, 20:30, 1] = 255  # green
    rgb[:, 30:40] = 255  # white; columns 0-9 black
    img = read_image(_save(rgb, tmp_path / "c.png"))
    assert img.pixels.shape == (20, 40)
    assert img.meta["photometric"] == "RGB->L"
    np.testing.assert_allclose(img.pixels[0, [0, 10, 20, 30]], [0.0, 0.299, 0.587, 1.0], atol=1e-6)


def test_format_from_content_not_extension(tmp_path):
    arr = _ramp(20, 20, 0, 255, np.uint8)
    path = tmp_path / "really_a_png.jpg"
    _save(arr, path, format="PNG")
    assert read_image(path).meta["format"] == "png"


def test_exif_orientation_applied(tmp_path):
    arr = _ramp(20, 40, 0, 255, np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.jpg"
    Image.fromarray(arr).save(path, exif=exif, quality=95)
    img = read_image(path)
    assert img.pixels.shape == (40, 20)
    assert (img.meta["height"], img.meta["width"]) == (40, 20)


def test_percentile_clip(tmp_path):
    arr = _ramp(50, 50, 100, 1100, np.uint16)
    arr[0, 0] = 65535  # one hot pixel
    plain = read_image(_save(arr, tmp_path / "h.png"))
    clipped = read_image(tmp_path / "h.png", ReadConfig(percentile_low=1.0, percentile_high=99.0))
    assert plain.pixels[25, 25] < 0.02  # the hot pixel squashes everything else
    lo, hi = np.percentile(arr, [1.0, 99.0])
    np.testing.assert_allclose(clipped.pixels, np.clip((arr - lo) / (hi - lo), 0, 1), atol=1e-6)
    assert clipped.pixels[0, 0] == 1.0 and clipped.pixels[0, 1] == 0.0


def test_foreground_box_on_bordered_image(tmp_path):
    arr = np.random.default_rng(0).integers(60, 200, (80, 100), dtype=np.uint8)
    arr[:12] = 0
    arr[:, :7] = 0
    arr[70:] = 0
    arr[:, 91:] = 255  # white frame
    img = read_image(_save(arr, tmp_path / "b.png"))
    assert img.foreground == (12, 7, 70, 91)


def test_decode_image_is_read_image_before_normalising(tmp_path):
    arr = np.random.default_rng(4).integers(500, 3000, (60, 70), dtype=np.uint16)
    arr[:9] = 0
    path = _save(arr, tmp_path / "d.png")
    decoded, loaded = decode_image(path), read_image(path)
    assert decoded.values.dtype == np.uint16  # the stored numbers, not a float copy
    assert (decoded.zero, decoded.one) == (0.0, float(arr.max()))
    np.testing.assert_array_equal(decoded.normalized(), loaded.pixels)
    assert decoded.foreground_box(0.02) == loaded.foreground == (9, 0, 60, 70)
    assert decoded.meta == loaded.meta


def test_dicom_rescale_and_inversion_stay_unapplied(tmp_path):
    arr = np.random.default_rng(6).integers(0, 4096, (32, 40), dtype=np.uint16)
    path = _write_dicom(
        tmp_path / "m1.dcm", arr, photometric="MONOCHROME1", RescaleSlope=2, RescaleIntercept=-1024
    )
    decoded = decode_image(path)
    assert decoded.values.dtype == np.uint16  # no full-size float64 copy for a linear map
    assert (decoded.zero, decoded.one) == (arr.max(), arr.min())  # inverted: the largest value maps to 0
    np.testing.assert_allclose(decoded.normalized(), 1.0 - _minmax(arr), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_pixels_same_when_pillow_holds_the_image_in_several_blocks(tmp_path, dtype):
    # Pillow's memory is shared with numpy only for images in one block; others are copied. Both agree.
    arr = np.random.default_rng(5).integers(0, np.iinfo(dtype).max, (64, 100)).astype(dtype)
    path = _save(arr, tmp_path / "blocks.png")
    one_block = decode_image(path).values
    default = Image.core.get_block_size()
    Image.core.set_block_size(4096)  # far below the image's size: rows land in several blocks
    try:
        many_blocks = decode_image(path).values
    finally:
        Image.core.set_block_size(default)
    np.testing.assert_array_equal(one_block, arr)
    np.testing.assert_array_equal(many_blocks, arr)


def test_pixel_sha1_identifies_pixels(tmp_path):
    arr = _ramp(20, 30, 0, 255, np.uint8)
    a = read_image(_save(arr, tmp_path / "a.png")).meta["pixel_sha1"]
    b = read_image(_save(arr, tmp_path / "b.tif")).meta["pixel_sha1"]
    other = arr.copy()
    other[0, 0] += 1
    c = read_image(_save(other, tmp_path / "c.png")).meta["pixel_sha1"]
    reshaped = read_image(_save(arr.reshape(30, 20), tmp_path / "d.png")).meta["pixel_sha1"]
    assert a == b
    assert len({a, c, reshaped}) == 3


def test_constant_image_rejected(tmp_path):
    path = _save(np.full((32, 32), 9, dtype=np.uint8), tmp_path / "flat.png")
    with pytest.raises(RejectError, match=r"constant image \(min == max == 9\)"):
        read_image(path)


def test_tiny_image_rejected(tmp_path):
    path = _save(_ramp(8, 64, 0, 255, np.uint8), tmp_path / "tiny.png")
    with pytest.raises(RejectError, match="too small"):
        read_image(path)


def test_truncated_png_rejected(tmp_path):
    arr = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _save(arr, tmp_path / "full.png").read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(RejectError, match="cannot decode PNG.*truncated"):
        read_image(path)


def test_text_file_rejected(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image, whatever the name says\n")
    with pytest.raises(RejectError, match=r"not an image file \(unrecognised format\)"):
        read_image(path)


def test_empty_file_rejected(tmp_path):
    path = tmp_path / "empty.png"
    path.touch()
    with pytest.raises(RejectError, match="empty file"):
        read_image(path)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR claims the given size, followed by the start of an unfinished image stream."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    stream = zlib.compressobj()
    idat = stream.compress(bytes(width + 1)) + stream.flush(zlib.Z_SYNC_FLUSH)  # one scanline, not finished
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat))
    return path


def test_bomb_rejected_from_header_before_decoding(tmp_path):
    # 108 M pixels: over our limit, under Pillow's own (which only warns).
    path = _png_header_only(tmp_path / "big.png", 12_000, 9_000)
    with (
        pytest.warns(Image.DecompressionBombWarning),
        pytest.raises(RejectError, match="too large.*max_pixels"),
    ):
        read_image(path)
    # With a higher limit the reader gets as far as decoding, which fails on the missing data.
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(RejectError, match="truncated"):
        read_image(path, ReadConfig(max_pixels=200_000_000))


def test_bomb_over_pillow_limit_rejected(tmp_path):
    path = _png_header_only(tmp_path / "huge.png", 100_000, 100_000)
    with pytest.raises(RejectError, match="decompression bomb"):
        read_image(path)


def test_small_max_pixels_rejects(tmp_path):
    path = _save(_ramp(64, 64, 0, 255, np.uint8), tmp_path / "a.png")
    with pytest.raises(RejectError, match="too large: 64x64 = 4096 pixels > max_pixels 4000"):
        read_image(path, ReadConfig(max_pixels=4000))


def test_missing_file_rejected(tmp_path):
    with pytest.raises(RejectError, match="cannot read file: No such file"):
        read_image(tmp_path / "nope.png")


def test_directory_rejected(tmp_path):
    with pytest.raises(RejectError, match="cannot read file: Is a directory"):
        read_image(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"percentile_low": 50.0, "percentile_high": 50.0},
        {"percentile_high": 101.0},
        {"percentile_low": -1.0},
        {"foreground_tolerance": 1.5},
        {"min_side": 0},
        {"max_pixels": 10},
    ],
)
def test_read_config_rejects_bad_values(kwargs):
    with pytest.raises(ValueError):
        ReadConfig(**kwargs)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunks.append((data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_with_short_stream(src: Path, path: Path, drop_rows: int) -> Path:
    """``src`` (8 or 16 bit, grey or colour) without the last ``drop_rows`` rows of its image data, in a
    complete, valid zlib stream followed by IEND.

    Pillow fills the rows it never receives with black and reports nothing (its decoder stops at the end of
    the stream). Whole rows are dropped: a stream that ends inside a row is reported as truncated. In an
    interlaced image the rows of the last pass are dropped, which are full rows too.
    """
    chunks = _png_chunks(src.read_bytes())
    width, _, depth, colour = struct.unpack(">IIBB", chunks[0][1][:10])
    row = 1 + width * depth // 8 * {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(data for kind, data in chunks if kind == b"IDAT"))
    idat = zlib.compress(raw[: len(raw) - drop_rows * row])
    head = [c for c in chunks if c[0] not in (b"IDAT", b"IEND")]
    body = b"".join(_png_chunk(kind, data) for kind, data in [*head, (b"IDAT", idat), (b"IEND", b"")])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + body)
    return path


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_png_whose_image_data_ends_early_is_rejected(tmp_path, interlace, dtype):
    arr = np.random.default_rng(2).integers(1, 200, (48, 40)).astype(dtype)
    full = _save(arr, tmp_path / "full.png", interlace=interlace)
    np.testing.assert_allclose(read_image(full).pixels, _minmax(arr), atol=1e-6)
    path = _png_with_short_stream(full, tmp_path / "short.png", drop_rows=5)
    with pytest.raises(RejectError, match=r"^cannot decode PNG: image data ends early \(\d+ of \d+ bytes\)$"):
        decode_image(path)


@pytest.mark.parametrize("interlace", [0, 1])
@pytest.mark.parametrize("mode", ["1", "L", "I;16", "LA", "RGB", "RGBA", "P"])
def test_png_with_black_last_rows_is_not_mistaken_for_a_short_one(tmp_path, interlace, mode):
    """A black bottom makes the reader count the image data, which must then come out exactly right for every
    colour type and bit depth (odd sizes: partial Adam7 passes and packed 1-bit rows)."""
    arr = _ramp(37, 29, 1, 255, np.uint8)
    arr[-3:] = 0
    im = (
        Image.fromarray(arr).convert(mode) if mode != "I;16" else Image.fromarray(arr.astype(np.uint16) * 250)
    )
    path = tmp_path / "black.png"
    im.save(path, interlace=interlace)
    png.check_complete(path)  # directly: a palette or alpha channel can hide the black row from the reader
    img = read_image(path)
    assert img.pixels.shape == (37, 29) and img.pixels[-3:].max() == 0.0


@pytest.mark.parametrize(("fmt", "suffix"), [("PNG", "png"), ("JPEG", "jpg")])
def test_truncated_images_are_rejected_even_if_pillow_is_told_to_load_them(
    tmp_path, monkeypatch, fmt, suffix
):
    """Another library in the process may switch Pillow's LOAD_TRUNCATED_IMAGES on; the reader ignores it."""
    from PIL import ImageFile

    arr = np.random.default_rng(4).integers(0, 256, (64, 64), dtype=np.uint8)
    data = _save(arr, tmp_path / f"full.{suffix}", format=fmt).read_bytes()
    path = tmp_path / f"cut.{suffix}"
    path.write_bytes(data[: len(data) * 2 // 3])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(RejectError, match=rf"cannot decode {fmt}: image file is truncated"):
        decode_image(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True, "the caller's setting is restored"
