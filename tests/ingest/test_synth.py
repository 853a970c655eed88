"""The synthetic radiograph corpus: plan (classes, sizes, formats), files on disk, determinism, learnability."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from radstream.ingest.synth import synthesize
from radstream.ingest.synth_detector import radiograph
from radstream.ingest.synth_formats import encode_png
from radstream.ingest.synth_plan import IRMA_CODES, REGION_COUNTS, plan_corpus, region_counts

REGION_DIGITS = {name: str(digit) for digit, name in enumerate(REGION_COUNTS, start=1)}


def file_hashes(root: Path) -> dict[str, str]:
    """sha256 of every file below ``root`` (hidden ones included), by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def read_display(path: Path) -> np.ndarray:
    """Pixels as a correct reader shows them, min-max normalised: modality LUT, MONOCHROME1 inverted."""
    if path.suffix == ".dcm":
        ds = pydicom.dcmread(path)
        values = apply_modality_lut(ds.pixel_array, ds).astype(np.float64)
        if ds.PhotometricInterpretation == "MONOCHROME1":
            values = -values
    else:
        values = np.asarray(Image.open(path)).astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


def intended_display(spec, seed: int) -> np.ndarray:
    """The [0, 1] image the corpus meant to store for ``spec`` (its random stream is (seed, 1, index))."""
    return radiograph(spec.region, spec.height, spec.width, np.random.default_rng([seed, 1, spec.index]))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("synth") / "corpus"
    return root, synthesize(root, n=60, seed=3, max_side=256)


@pytest.fixture(scope="module")
def manifest(corpus) -> list[dict[str, str]]:
    root, _ = corpus
    with open(root / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


# --- plan ------------------------------------------------------------------------------------------------


def test_region_counts_reproduce_the_irma_list_exactly():
    assert region_counts(sum(REGION_COUNTS.values())) == REGION_COUNTS


def test_class_proportions_follow_the_imbalance():
    n = 2000
    counts = Counter(s.region for s in plan_corpus(n, seed=5, max_side=64))
    assert sum(counts.values()) == n
    total = sum(REGION_COUNTS.values())
    for region, real in REGION_COUNTS.items():
        assert abs(counts[region] - n * real / total) <= 1, region
    assert counts.most_common(1)[0][0] == "chest"
    assert 1 <= counts["whole_body"] <= 2  # ~0.02 %, but present so the builder's drop is exercised
    by_size = [r for r, _ in counts.most_common() if r != "whole_body"]
    assert by_size[:3] == ["chest", "lower_extremity", "upper_extremity"]
    assert set(by_size[-3:]) == {"abdomen", "pelvis", "breast"}


def test_small_corpora_keep_every_region():
    assert all(c >= 1 for r, c in region_counts(16).items() if r != "whole_body")
    assert region_counts(199)["whole_body"] == 0 and region_counts(200)["whole_body"] == 1


def test_patients_have_one_to_four_images_mostly_of_one_region():
    specs = plan_corpus(3000, seed=2, max_side=64)
    by_patient: dict[str, list] = {}
    for s in specs:
        by_patient.setdefault(s.patient_id, []).append(s)
    assert all(len(v) in (1, 2, 3, 4) for v in by_patient.values())
    assert all(p.startswith("P") and len(p) == 7 and p[1:].isdigit() for p in by_patient)
    mixed = sum(len({s.region for s in v}) > 1 for v in by_patient.values())
    assert 0 < mixed < 0.15 * len(by_patient)
    assert sum(len(v) > 1 for v in by_patient.values()) > 0.3 * len(by_patient)
    assert len({s.relpath for s in specs}) == len(specs)


def test_sizes_and_aspects_span_a_clinical_archive():
    specs = plan_corpus(2000, seed=1, max_side=2500)
    h = np.array([s.height for s in specs])
    w = np.array([s.width for s in specs])
    aspect = h / w
    assert h.max() == 2500 and w.max() == 2500 and max(h.max(), w.max()) <= 2500
    assert min(h.min(), w.min()) <= 220 and min(h.min(), w.min()) >= 195
    assert aspect.min() <= 0.45 and aspect.max() >= 2.3
    assert aspect.min() >= 0.4 - 1e-3 and aspect.max() <= 2.5 + 1e-3
    shapes = Counter(zip(h, w, strict=True))
    for detector in [(2500, 2048), (2048, 2500), (1760, 1760), (1024, 1024), (2294, 1914), (2500, 1994)]:
        assert shapes[detector] >= 3, detector
    assert len(shapes) > 600  # plus many random sizes
    breast = aspect[[s.region == "breast" for s in specs]]
    assert breast.min() > 1.1  # portrait
    limbs = np.abs(np.log(aspect[[s.region.endswith("extremity") for s in specs]]))
    chest = np.abs(np.log(aspect[[s.region == "chest" for s in specs]]))
    assert np.median(limbs) > 2 * np.median(chest)  # extremities elongated


def test_small_max_side_scales_sizes_and_keeps_the_aspect_mix():
    big = plan_corpus(1000, seed=4, max_side=2500)
    small = plan_corpus(1000, seed=4, max_side=500)
    assert max(max(s.height, s.width) for s in small) == 500
    ratio = [b.height / s.height for b, s in zip(big, small, strict=True) if b.height == 2500]
    assert np.allclose(ratio, 5, atol=0.05)
    aspects = [np.log([s.height / s.width for s in p]) for p in (big, small)]
    assert np.allclose(
        np.percentile(aspects[0], [5, 50, 95]), np.percentile(aspects[1], [5, 50, 95]), atol=0.05
    )


def test_format_mix():
    specs = plan_corpus(3000, seed=0, max_side=64)
    share = Counter(s.fmt for s in specs)
    for fmt, expected in {"png8": 0.45, "png16": 0.30, "dicom": 0.25}.items():
        assert abs(share[fmt] / len(specs) - expected) < 0.03, fmt
    dicom = [s for s in specs if s.fmt == "dicom"]
    assert {s.photometric for s in dicom} == {"MONOCHROME1", "MONOCHROME2"}
    assert {s.bits_stored for s in dicom} == {12, 16}
    assert {s.modality for s in dicom} == {"CR", "DX", "MG"}
    assert all(s.modality == "MG" for s in dicom if s.region == "breast")
    assert 0.2 < np.mean([s.rescale is not None for s in dicom]) < 0.6
    assert {(s.bits_stored, s.shift) for s in specs if s.fmt == "png16"} == {(12, 0), (12, 4), (16, 0)}


def test_irma_codes_match_their_region():
    for region, codes in IRMA_CODES.items():
        for code in codes:
            parts = code.split("-")
            assert [len(p) for p in parts] == [4, 3, 3, 3] and parts[2][0] == REGION_DIGITS[region], code


@pytest.mark.parametrize(
    "kwargs", [{"n": 0}, {"seed": -1}, {"max_side": 32}, {"workers": 0}], ids=lambda k: next(iter(k))
)
def test_bad_arguments_are_rejected(tmp_path, kwargs):
    with pytest.raises(ValueError):
        synthesize(tmp_path, **{"n": 4, "seed": 0, "max_side": 128, **kwargs})


# --- files -----------------------------------------------------------------------------------------------


def test_png_encoder_roundtrips_through_pillow():
    rng = np.random.default_rng(0)
    for dtype, mode in [(np.uint8, "L"), (np.uint16, "I;16")]:
        pixels = rng.integers(0, np.iinfo(dtype).max + 1, size=(37, 53), dtype=dtype)
        image = Image.open(io.BytesIO(encode_png(pixels)))
        assert image.mode == mode
        np.testing.assert_array_equal(np.asarray(image), pixels)


def test_layout_and_tables_match_the_files(corpus, manifest):
    root, summary = corpus
    files = sorted(str(p.relative_to(root)) for p in (root / "images").rglob("*") if p.is_file())
    assert files == sorted(r["path"] for r in manifest)
    assert not [f for f in files if Path(f).name.startswith(".")]  # no temporary files left
    for row in manifest:
        region_dir, name = Path(row["path"]).parts[1:]
        assert region_dir == row["label"] and name.startswith(row["patient_id"] + "_")
        assert row["irma_code"].split("-")[2][0] == REGION_DIGITS[row["label"]]
    with open(root / "irma_codes.csv", newline="") as f:
        codes = list(csv.reader(f, delimiter=";"))
    assert codes[0] == ["image_id", "irma_code"]
    assert {(Path(r["path"]).stem, r["irma_code"]) for r in manifest} == {tuple(c) for c in codes[1:]}
    assert len(codes) - 1 == len(manifest) == 60
    assert set(summary["classes"]) == set(REGION_COUNTS)
    assert Counter(r["label"] for r in manifest) == {k: v for k, v in summary["classes"].items() if v}
    assert all(summary["classes"][r] >= 1 for r in REGION_COUNTS if r != "whole_body")
    saved = json.loads((root / "synth.json").read_text())
    assert saved["parameters"] == {"n": 60, "seed": 3, "max_side": 256} and saved["complete"] is True
    assert saved["formats"] == summary["formats"] and summary["written"] == 60


def test_every_format_is_present_and_readable(corpus, manifest):
    root, summary = corpus
    assert all(count > 0 for count in summary["formats"].values())
    specs = {s.relpath: s for s in plan_corpus(60, seed=3, max_side=256)}
    seen = set()
    for row in manifest:
        spec, path = specs[row["path"]], root / row["path"]
        if spec.fmt == "dicom":
            ds = pydicom.dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
            assert (ds.PatientID, ds.BitsAllocated, ds.BitsStored) == (
                row["patient_id"],
                16,
                spec.bits_stored,
            )
            pixels = ds.pixel_array
            seen.add(("dicom", ds.PhotometricInterpretation))
        else:
            image = Image.open(path)
            pixels = np.asarray(image)
            seen.add((spec.fmt, image.mode))
        assert pixels.shape == (spec.height, spec.width)
        assert int(pixels.max()) < 2**spec.bits_stored << spec.shift
    assert {("png8", "L"), ("png16", "I;16"), ("dicom", "MONOCHROME1"), ("dicom", "MONOCHROME2")} <= seen


def test_pixels_are_the_intended_image_and_monochrome1_is_stored_inverted(corpus, manifest):
    root, _ = corpus
    specs = {s.relpath: s for s in plan_corpus(60, seed=3, max_side=256)}
    for row in manifest:
        spec, path = specs[row["path"]], root / row["path"]
        intended = intended_display(spec, seed=3).ravel()
        assert np.corrcoef(read_display(path).ravel(), intended)[0, 1] > 0.999, row["path"]
        if spec.fmt == "dicom":
            raw = pydicom.dcmread(path).pixel_array.ravel().astype(np.float64)
            sign = -1 if spec.photometric == "MONOCHROME1" else 1
            assert sign * np.corrcoef(raw, intended)[0, 1] > 0.999, row["path"]


def test_rerun_skips_existing_files_and_other_parameters_are_refused(corpus):
    root, _ = corpus
    before = file_hashes(root)
    again = synthesize(root, n=60, seed=3, max_side=256)
    assert (again["written"], again["skipped"]) == (0, 60)
    assert file_hashes(root) == before
    with pytest.raises(ValueError, match="other|made with"):
        synthesize(root, n=60, seed=4, max_side=256)


def test_interrupted_run_is_completed(tmp_path):
    synthesize(tmp_path / "a", n=12, seed=9, max_side=128)
    victims = sorted((tmp_path / "a" / "images").rglob("*.*"))[::3]
    for p in victims:
        p.unlink()
    (tmp_path / "a" / "manifest.csv").unlink()
    redo = synthesize(tmp_path / "a", n=12, seed=9, max_side=128)
    assert redo["written"] == len(victims)
    synthesize(tmp_path / "b", n=12, seed=9, max_side=128)
    assert file_hashes(tmp_path / "a") == file_hashes(tmp_path / "b")


def test_deterministic_bytes_across_runs_and_workers(tmp_path):
    synthesize(tmp_path / "one", n=24, seed=7, max_side=256, workers=1)
    synthesize(tmp_path / "two", n=24, seed=7, max_side=256, workers=2)
    synthesize(tmp_path / "other", n=24, seed=8, max_side=256)
    one = file_hashes(tmp_path / "one")
    assert one == file_hashes(tmp_path / "two")
    other = file_hashes(tmp_path / "other")
    assert sum(one.get(k) == v for k, v in other.items()) <= 1  # only synth.json's shape could ever agree


# --- learnability ----------------------------------------------------------------------------------------


def test_classes_are_separable_by_a_linear_classifier(tmp_path):
    """A softmax regression on 32×32 thumbnails, trained on half, beats chance and the majority class."""
    root = tmp_path / "corpus"
    synthesize(root, n=400, seed=11, max_side=128)
    with open(root / "manifest.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["label"] != "whole_body"]
    thumbs = [Image.fromarray(read_display(root / r["path"]).astype(np.float32)) for r in rows]
    x = np.stack([np.asarray(t.resize((32, 32), Image.BILINEAR)).ravel() for t in thumbs])
    names = sorted({r["label"] for r in rows})
    y = np.array([names.index(r["label"]) for r in rows])
    train = np.arange(len(y)) % 2 == 0
    x = (x - x[train].mean(0)) / (x[train].std(0) + 1e-3)
    weights, bias = np.zeros((x.shape[1], len(names))), np.zeros(len(names))
    onehot = np.eye(len(names))[y[train]]
    for _ in range(300):
        logits = x[train] @ weights + bias
        p = np.exp(logits - logits.max(1, keepdims=True))
        grad = p / p.sum(1, keepdims=True) - onehot
        weights -= 0.05 * (x[train].T @ grad / len(grad) + 1e-2 * weights)
        bias -= 0.05 * grad.mean(0)
    predicted = np.argmax(x[~train] @ weights + bias, 1)
    accuracy = np.mean(predicted == y[~train])
    majority = np.bincount(y[~train]).max() / (~train).sum()
    assert len(names) == 8
    assert accuracy > 0.5 and accuracy > majority + 0.2, (accuracy, majority)
