"""End-to-end shard builds: counts, bad inputs, parts/tasks, resume after SIGKILL, verification."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pydicom
import pytest
from PIL import Image

from radstream.core.config import load_config
from radstream.ingest.readers import read_image
from radstream.shards.builder.config import BuildConfig
from radstream.shards.builder.finalize import BuildIncomplete, finalize
from radstream.shards.builder.parts import run_build
from radstream.shards.builder.private import source_names
from radstream.shards.builder.verify import verify_shards
from tests.conftest import build_tiny_shards


def _tar_digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.glob("*/*/*"))
        if p.suffix in (".tar", ".idx")
    }


def test_tiny_build_counts_and_layout(tiny_shards: Path) -> None:
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["seen"] == c["written"] + c["rejected"] + c["duplicates"]
    assert c["written"] > 40
    samples = pq.read_table(tiny_shards / "samples.parquet").to_pylist()
    assert len(samples) == c["written"]
    assert len({s["key"] for s in samples}) == len(samples)
    for b in manifest["bins"]:
        h, w = b["height"], b["width"]
        assert h % 16 == 0 and w % 16 == 0 and (h // 16) * (w // 16) <= 24
        for shard in b["shards"]:
            tar = tiny_shards / shard["path"]
            split, bin_name, name = shard["path"].split("/")
            assert bin_name == b["name"] and name.startswith(f"{split}-{bin_name}-") and tar.is_file()
            assert tar.with_suffix(".idx").is_file()
            assert shard["samples"] <= 8
    assert sum(manifest["split_sizes"].values()) == c["written"]
    # No patient in two splits.
    split_of = {}
    for s in samples:
        assert split_of.setdefault(s["patient_id"], s["split"]) == s["split"]
    assert not list(tiny_shards.glob("*/*/.*")), "temporary files left behind"


def test_samples_carry_the_readers_foreground_box(tiny_shards: Path, synth_corpus: Path) -> None:
    # The build finds the box on the stored numbers; read_image on the normalised image: the same box.
    samples = pq.read_table(tiny_shards / "samples.parquet").to_pylist()
    names = source_names(tiny_shards)  # the private map: path hash -> path
    for s in samples[:: max(1, len(samples) // 12)]:
        loaded = read_image(synth_corpus / "images" / names[s["source_hash"]])
        assert tuple(s["foreground"]) == loaded.foreground
        assert (s["height"], s["width"]) == loaded.pixels.shape
    assert any(tuple(s["foreground"]) != (0, 0, s["height"], s["width"]) for s in samples)


def test_verify_passes_then_catches_damage(tiny_shards: Path, tmp_path: Path) -> None:
    report = verify_shards(tiny_shards)
    assert report.ok, report.problems
    assert report.decoded == report.samples > 0
    damaged = tmp_path / "copy"
    shutil.copytree(tiny_shards, damaged)
    tar = next(damaged.glob("train/*/*.tar"))
    data = bytearray(tar.read_bytes())
    data[700] ^= 0xFF
    tar.write_bytes(bytes(data))
    report = verify_shards(damaged)
    assert not report.ok
    assert any("sha256" in p for p in report.problems)


def test_build_is_deterministic_and_task_split_invariant(synth_corpus: Path, tmp_path: Path) -> None:
    one = build_tiny_shards(synth_corpus, tmp_path / "one")
    cfg = load_config(
        BuildConfig,
        tmp_path / "one" / "_work" / "config.yaml",
        [f"out={tmp_path / 'three'}"],
    )
    for task in range(3):
        run_build(cfg, task_index=task, num_tasks=3)
    finalize(cfg)
    assert _tar_digests(one) == _tar_digests(tmp_path / "three")
    a = pq.read_table(one / "samples.parquet").to_pylist()
    b = pq.read_table(tmp_path / "three" / "samples.parquet").to_pylist()
    assert a == b


def test_finalize_refuses_missing_parts(synth_corpus: Path, tmp_path: Path) -> None:
    cfg = load_config(
        BuildConfig,
        None,
        [f"source={synth_corpus / 'images'}", f"out={tmp_path / 'o'}", "shards.part_size=20"],
    )
    run_build(cfg, task_index=0, num_tasks=2)
    with pytest.raises(BuildIncomplete, match="not built yet"):
        finalize(cfg)


def test_rerun_skips_finished_parts(synth_corpus: Path, tmp_path: Path) -> None:
    cfg = load_config(BuildConfig, None, [f"source={synth_corpus / 'images'}", f"out={tmp_path / 'o'}"])
    assert run_build(cfg) == [0]
    assert run_build(cfg) == []


def _write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _bad_inputs(root: Path) -> dict[str, str]:
    """Write one file per kind of bad input; returns {relative path: expected words in the reject reason}."""
    rng = np.random.default_rng(0)
    good = (rng.random((64, 80)) * 255).astype(np.uint8)
    _write_png(root / "good_a.png", good)
    _write_png(root / "good_b.png", np.flipud(good).copy())
    _write_png(root / "dupe_of_a.png", good)
    _write_png(root / "constant.png", np.full((64, 64), 7, np.uint8))
    _write_png(root / "tiny.png", good[:8, :8])
    full = (root / "good_a.png").read_bytes()
    (root / "truncated.png").write_bytes(full[: len(full) // 2])
    (root / "notes.png").write_text("this is not an image\n")
    bomb = Image.new("L", (1, 1))
    bomb.save(root / "bomb.png")
    raw = bytearray((root / "bomb.png").read_bytes())
    raw[16:24] = (200_000).to_bytes(4, "big") + (200_000).to_bytes(4, "big")  # IHDR width/height
    raw[29:33] = zlib.crc32(bytes(raw[12:29])).to_bytes(4, "big")  # keep the chunk CRC valid
    (root / "bomb.png").write_bytes(bytes(raw))
    ds = pydicom.Dataset()
    ds.PatientID, ds.Modality = "X1", "CR"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored = 64, 64, 16, 12
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4.5"
    ds.save_as(root / "nopixels.dcm", enforce_file_format=True)
    (root / "unreadable.png").symlink_to(root / "does-not-exist.png")
    return {
        "dupe_of_a.png": "duplicate",
        "constant.png": "constant",
        "tiny.png": "smaller than one patch",
        "truncated.png": "",
        "notes.png": "not an image",
        "bomb.png": "absurd dimensions",
        "nopixels.dcm": "no pixel data",
        "unreadable.png": "",
        "unknown_code.png": "unknown IRMA code",
    }


def test_bad_inputs_are_rejected_with_reasons(tmp_path: Path) -> None:
    src = tmp_path / "src"
    expected = _bad_inputs(src)
    rng = np.random.default_rng(1)
    _write_png(src / "unknown_code.png", (rng.random((64, 64)) * 255).astype(np.uint8))
    rows = ["path,irma_code,patient_id"]
    for i, name in enumerate(sorted(expected) + ["good_a.png", "good_b.png"]):
        code = "1121-127-0a0-000" if name == "unknown_code.png" else "1121-127-500-000"
        rows.append(f"{name},{code},P{i}")
    (src / "manifest.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(
        BuildConfig,
        None,
        [
            f"source={src}",
            f"out={tmp_path / 'out'}",
            f"ingest.manifest_csv={src / 'manifest.csv'}",
            "ingest.labels=irma",
            "binning.strategy=fixed",
            "binning.shape=32x32",
            "ingest.splits.fractions=[1,0,0]",
        ],
    )
    run_build(cfg)
    manifest = finalize(cfg)
    rejects = [
        json.loads(line)
        for line in (tmp_path / "out" / "_private" / "rejects.jsonl").read_text().splitlines()
    ]
    reasons = {Path(r["path"]).name: r["reason"] for r in rejects}
    for name, words in expected.items():
        assert name in reasons, f"{name} not rejected: {reasons}"
        assert words.lower() in reasons[name].lower(), (name, reasons[name])
        assert "\n" not in reasons[name]
    c = manifest["counts"]
    assert c["written"] == 2
    assert c["seen"] == c["written"] + c["rejected"] + c["duplicates"] == len(expected) + 2


_KILL_SCRIPT = """
import sys
from radstream.core.config import load_config
from radstream.ingest.readers import read_image
from radstream.shards.builder.parts import run_build
from radstream.shards.builder.private import source_names
from radstream.shards.builder.config import BuildConfig
cfg = load_config(BuildConfig, None, sys.argv[1:])
run_build(cfg)
"""


def test_sigkill_then_rerun_gives_identical_shards(synth_corpus: Path, tmp_path: Path) -> None:
    args = [
        f"source={synth_corpus / 'images'}",
        "shards.part_size=6",
        "shards.max_samples_per_shard=3",
        "binning.max_tokens=24",
    ]
    clean = tmp_path / "clean"
    cfg = load_config(BuildConfig, None, [*args, f"out={clean}"])
    run_build(cfg)
    finalize(cfg)
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-c", _KILL_SCRIPT, *args, f"out={killed}"], env=env)
    record = killed / "_work" / "parts" / "part-0001.json"
    deadline = time.time() + 120
    while not record.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "_work" / "parts" / "part-0009.json").exists(), "build finished before the kill"
    cfg_k = load_config(BuildConfig, None, [*args, f"out={killed}"])
    run_build(cfg_k)
    finalize(cfg_k)
    assert _tar_digests(clean) == _tar_digests(killed)
    assert verify_shards(killed).ok


def test_an_unexpected_failure_on_one_file_is_a_reject_not_a_crash(tmp_path: Path, monkeypatch) -> None:
    """A decoder bug on one file (here: a TypeError from a monkeypatched decoder) rejects that file only."""
    import radstream.shards.builder.parts as build

    src = tmp_path / "src"
    rng = np.random.default_rng(3)
    for name in ("a.png", "b.png", "boom.png"):
        _write_png(src / name, (rng.random((48, 64)) * 255).astype(np.uint8))
    real = build.decode_image

    def flaky(path, cfg):
        if Path(path).name == "boom.png":
            raise TypeError("float() argument must be a string or a real number, not 'NoneType'")
        return real(path, cfg)

    monkeypatch.setattr(build, "decode_image", flaky)
    cfg = load_config(
        BuildConfig,
        None,
        [
            f"source={src}",
            f"out={tmp_path / 'out'}",
            "binning.strategy=fixed",
            "binning.shape=32x32",
            "ingest.splits.fractions=[1,0,0]",
        ],
    )
    run_build(cfg)
    manifest = finalize(cfg)
    assert manifest["counts"]["written"] == 2 and manifest["counts"]["rejected"] == 1
    reject = json.loads((tmp_path / "out" / "_private" / "rejects.jsonl").read_text().splitlines()[0])
    assert reject["path"] == "boom.png" and reject["reason"].startswith("unexpected TypeError")


def test_dicom_with_empty_rescale_slope_is_read_as_no_rescale(tmp_path: Path) -> None:
    from radstream.ingest.readers import read_image

    ds = pydicom.Dataset()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = "1.2.3.4.6"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 16, 12, 11
    ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
    ds.RescaleSlope, ds.RescaleIntercept = "", ""
    ds.PixelData = (np.arange(32 * 32, dtype=np.uint16) % 4096).tobytes()
    ds.save_as(tmp_path / "x.dcm", enforce_file_format=True)
    img = read_image(tmp_path / "x.dcm")
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
