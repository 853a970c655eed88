"""Header fuzzing: a mutated file is either read or rejected with a one-line reason, never an exception.

Each case takes a valid file (a real DICOM from ../shared/data, or a PNG / JPEG made here), changes, inserts or
deletes one byte in its first 2 KB or truncates it, and runs both entry points of the build on it: the header
scan (:func:`radstream.ingest.scan.scan_header`) and the decode (:func:`radstream.ingest.readers.decode_image`). The seed is
fixed, so a failure names a case that reproduces. The default run is a few hundred cases; ``-m fuzz`` runs
thousands.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from radstream.ingest.dicom import one_line
from radstream.ingest.errors import RejectError
from radstream.ingest.readers import ReadConfig, decode_image
from radstream.ingest.scan import scan_header

SEED = 20261130
HEAD_BYTES = 2048
"""Changed, inserted and deleted bytes land in the header: the first 2 KB."""
# Cases in the default run (per kind of file) and under the fuzz marker. DICOM cases decode real radiographs
# (0.1 s each), so they get fewer.
DEFAULT_CASES = {"dicom": 70, "png": 200, "jpeg": 150}
FUZZ_CASES = {"dicom": 1500, "png": 3000, "jpeg": 3000}
_BOUNDARY_BYTES = (0, 1, 2, 12, 16, 32, 64, 127, 128, 254, 255)


def _mutate(data: bytes, rng: np.random.Generator) -> tuple[str, bytes]:
    """One single-byte mutation: a byte changed, inserted or deleted in the header, or a truncation."""
    head = min(len(data), HEAD_BYTES)
    # Half uniform over the 2 KB, half log-uniform: PNG and JPEG headers are a few dozen to hundreds of bytes.
    pos = int(rng.integers(0, head)) if rng.random() < 0.5 else int(head ** rng.random()) - 1
    op = ("flip", "boundary", "insert", "delete", "truncate")[int(rng.integers(0, 5))]
    if op in ("flip", "boundary"):
        # A boundary value in a length or count field finds more parser bugs than a random one.
        byte = data[pos] ^ int(rng.integers(1, 256)) if op == "flip" else int(rng.choice(_BOUNDARY_BYTES))
        return f"{op}@{pos}", data[:pos] + bytes([byte]) + data[pos + 1 :]
    if op == "insert":
        return f"insert@{pos}", data[:pos] + bytes([int(rng.integers(0, 256))]) + data[pos:]
    if op == "delete":
        return f"delete@{pos}", data[:pos] + data[pos + 1 :]
    cut = int(rng.integers(1, len(data)))  # anywhere: a file cut short in its pixel data too
    return f"truncate@{cut}", data[:cut]


def _escapes(path: Path, cfg: ReadConfig) -> list[str]:
    """What escaped scan and decode: each must succeed or raise RejectError with a one-line reason."""
    found = []
    for name, read in (("scan", scan_header), ("decode", decode_image)):
        try:
            read(path, cfg)
        except RejectError as err:
            reason = str(err)
            if not reason or "\n" in reason:
                found.append(f"{name}: reason is not one line: {reason!r}")
        except Exception as err:  # noqa: BLE001 - what the test looks for
            found.append(f"{name}: {type(err).__name__}: {one_line(err)[:160]}")
    return found


def _fuzz(seeds: dict[str, bytes], cases: int, tmp_path: Path, seed: int) -> list[str]:
    """Run ``cases`` mutations spread over ``seeds``; returns one line per escape."""
    rng = np.random.default_rng(seed)
    names = sorted(seeds)
    cfg = ReadConfig()
    escapes = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom and Pillow warn about most mutated headers
        for case in range(cases):
            name = names[case % len(names)]
            what, data = _mutate(seeds[name], rng)
            path = tmp_path / f"case{Path(name).suffix}"
            path.write_bytes(data)
            escapes += [f"case {case} ({name} {what}) {found}" for found in _escapes(path, cfg)]
    return escapes


def _image_seeds() -> dict[str, dict[str, bytes]]:
    """Small valid PNGs (8 and 16 bit, RGB, palette, interlaced) and JPEGs (grey, colour, progressive)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:64]
    gray = ((np.sin(xx / 7) + np.cos(yy / 5)) * 60 + 128 + rng.normal(0, 8, (48, 64))).clip(0, 255)
    gray8 = gray.astype(np.uint8)
    rgb = np.stack([gray8, gray8[::-1], 255 - gray8], axis=-1)
    variants = {
        "png": [
            (Image.fromarray(gray8), {}),
            (Image.fromarray((gray * 250).astype(np.uint16)), {}),
            (Image.fromarray(rgb), {}),
            (Image.fromarray(rgb).convert("P"), {}),
            (Image.fromarray(gray8), {"interlace": 1}),
        ],
        "jpeg": [
            (Image.fromarray(gray8), {"quality": 90}),
            (Image.fromarray(rgb), {"quality": 85}),
            (Image.fromarray(gray8), {"quality": 80, "progressive": True}),
        ],
    }
    seeds: dict[str, dict[str, bytes]] = {}
    for fmt, images in variants.items():
        seeds[fmt] = {}
        for i, (im, kwargs) in enumerate(images):
            buf = io.BytesIO()
            im.save(buf, fmt.upper(), **kwargs)
            seeds[fmt][f"{fmt}{i}.{fmt}"] = buf.getvalue()
    return seeds


def _dicom_seeds(shared_data: Path) -> dict[str, bytes]:
    """The real files' bytes (read only: every mutation is written to the test's own folder)."""
    files = sorted((shared_data / "dicom").glob("*.dcm"))
    if not files:
        pytest.skip(f"no real DICOM files in {shared_data / 'dicom'}")
    return {f.name: f.read_bytes() for f in files}


def _assert_no_escapes(escapes: list[str], cases: int) -> None:
    shown = "\n".join(escapes[:20])
    assert not escapes, f"{len(escapes)} exceptions escaped from {cases} mutated files:\n{shown}"


@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_mutated_images_are_read_or_rejected(fmt: str, tmp_path: Path) -> None:
    cases = DEFAULT_CASES[fmt]
    _assert_no_escapes(_fuzz(_image_seeds()[fmt], cases, tmp_path, SEED), cases)


def test_mutated_real_dicoms_are_read_or_rejected(shared_data: Path, tmp_path: Path) -> None:
    cases = DEFAULT_CASES["dicom"]
    _assert_no_escapes(_fuzz(_dicom_seeds(shared_data), cases, tmp_path, SEED), cases)


@pytest.mark.fuzz
@pytest.mark.parametrize("fmt", ["png", "jpeg"])
def test_many_mutated_images(fmt: str, tmp_path: Path) -> None:
    cases = FUZZ_CASES[fmt]
    _assert_no_escapes(_fuzz(_image_seeds()[fmt], cases, tmp_path, SEED + 1), cases)


@pytest.mark.fuzz
def test_many_mutated_real_dicoms(shared_data: Path, tmp_path: Path) -> None:
    cases = FUZZ_CASES["dicom"]
    _assert_no_escapes(_fuzz(_dicom_seeds(shared_data), cases, tmp_path, SEED + 1), cases)
