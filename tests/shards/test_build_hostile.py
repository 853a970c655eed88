"""A hostile source tree: every bad entry is one line in rejects.jsonl, and the build completes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from radstream.core.config import load_config
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.finalize import finalize
from radstream.shards.builder.parts import run_build
from tests.ingest.test_dicom import _write_dicom
from tests.ingest.test_readers import _png_with_short_stream
from tests.ingest.test_scan import _patched_dicom, _pattern


def _hostile_tree(src: Path) -> dict[str, str]:
    """Two good images and one entry per kind of hostile input; returns {name: start of its reject reason}."""
    rng = np.random.default_rng(5)
    src.mkdir()
    for name in ("good_a.png", "good_b.png"):
        Image.fromarray(rng.integers(0, 256, (40, 48), dtype=np.uint8)).save(src / name)
    os.symlink("b_loop", src / "a_loop")
    os.symlink("a_loop", src / "b_loop")
    os.symlink("gone.png", src / "dangling.png")
    (src / "sub").mkdir()
    (src / "locked").mkdir()  # made unreadable by the test
    (src / "locked" / "inside.png").write_bytes((src / "good_a.png").read_bytes())
    os.symlink(src / "sub", src / "folder_link", target_is_directory=True)
    os.mkfifo(src / "pipe.png")  # opening it would block the build forever
    with open(os.fsencode(src) + b"/bad\xffname.png", "wb") as f:
        f.write((src / "good_b.png").read_bytes())
    os.mkdir(os.fsencode(src) + b"/caf\xe9")
    _write_dicom(src / "rows.dcm", _pattern(), Rows=[32, 32])
    _patched_dicom(
        src / "frames.dcm",
        b"\x28\x00\x08\x00IS\x02\x001 ",
        b"\x28\x00\x08\x00IS\x04\x00abc ",
        NumberOfFrames=1,
    )
    _patched_dicom(src / "vr.dcm", b"\x28\x00\x11\x00US", b"\x28\x00\x11\x00ZZ")
    (src / "empty.png").touch()
    ihdr = bytearray((src / "good_a.png").read_bytes())
    ihdr[11] = 12
    (src / "ihdr.png").write_bytes(bytes(ihdr))
    Image.fromarray(rng.integers(1, 256, (40, 48), dtype=np.uint8)).save(src / "sub" / "full.png")
    _png_with_short_stream(src / "sub" / "full.png", src / "short.png", drop_rows=10)
    (src / "sub" / "full.png").unlink()
    (src / ".x.png").write_bytes((src / "good_a.png").read_bytes())  # hidden: counted and rejected, not read
    (src / ".reviewed").mkdir()
    (src / ".reviewed" / "y.png").write_bytes((src / "good_b.png").read_bytes())
    return {
        ".x.png": "hidden file",
        "y.png": "hidden file",
        "a_loop": "symlink loop",
        "b_loop": "symlink loop",
        "dangling.png": "dangling link",
        "locked": "unreadable folder",
        "folder_link": "link to a folder",
        "pipe.png": "not a regular file",
        "bad\\xffname.png": "file name is not valid UTF-8",
        "caf\\xe9": "folder name is not valid UTF-8",
        "rows.dcm": "DICOM Rows holds 2 values",
        "frames.dcm": "DICOM NumberOfFrames 'abc' is not a whole number",
        "vr.dcm": "DICOM Columns cannot be read: Unknown Value Representation",
        "empty.png": "empty file",
        "ihdr.png": "cannot read PNG",
        "short.png": "cannot decode PNG: image data ends early",
    }


def test_one_bad_entry_never_stops_a_build(tmp_path: Path, monkeypatch) -> None:
    src = tmp_path / "src"
    expected = _hostile_tree(src)
    real_scandir = os.scandir

    def scandir(path):
        if Path(path) == src / "locked":  # tests run as root, who can read any folder
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    cfg = load_config(
        BuildConfig,
        None,
        [
            f"source={src}",
            f"out={out}",
            "binning.strategy=fixed",
            "binning.shape=32x32",
            "ingest.splits.fractions=[1,0,0]",
        ],
    )
    run_build(cfg)
    manifest = finalize(cfg)
    lines = (out / "_private" / "rejects.jsonl").read_text(encoding="utf-8").splitlines()
    rejects = {Path(r["path"]).name: r["reason"] for r in map(json.loads, lines)}
    assert sorted(rejects) == sorted(expected)
    for name, reason in expected.items():
        assert rejects[name].startswith(reason), (name, rejects[name])
        assert "\n" not in rejects[name] and "Traceback" not in rejects[name]
    c = manifest["counts"]
    assert (c["written"], c["rejected"], c["duplicates"]) == (2, len(expected), 0)
    assert c["seen"] == c["written"] + c["rejected"] + c["duplicates"]
