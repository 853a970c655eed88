"""The ingest stage: a source → typed, frozen records with label, patient, split and fractions, plus rejects."""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

import pytest

from radstream.ingest.config import IngestConfig, SplitConfig
from radstream.ingest.pipeline import IngestRecord, Reject, run_ingest


@pytest.fixture(scope="module")
def source(synth_corpus: Path, tmp_path_factory) -> Path:
    """The synth corpus's images plus one file that is not an image."""
    root = tmp_path_factory.mktemp("stage") / "images"
    root.symlink_to(synth_corpus / "images")
    return root


def test_records_are_typed_frozen_and_split(source: Path) -> None:
    cfg = IngestConfig(labels="folder", drop_labels=[], splits=SplitConfig(label_fractions=[0.5, 1.0]))
    result = run_ingest(source, cfg, seed=3)
    assert result.seen == len(result.records) + len(result.rejects) == 60
    record = result.records[0]
    assert isinstance(record, IngestRecord)
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.split = "val"  # type: ignore[misc]
    assert {r.split for r in result.records} == {"train", "val", "test"}
    assert all(Path(r.path).is_absolute() and not Path(r.rel).is_absolute() for r in result.records)
    assert all(r.height > 0 and r.width > 0 and r.patient for r in result.records)
    train = [r for r in result.records if r.split == "train"]
    assert all(r.fractions == (0.5, 1.0) or r.fractions == (1.0,) for r in train if r.label)
    assert all(r.fractions == () for r in result.records if r.split != "train")
    assert set(result.class_names) == {r.label for r in result.records}
    again = run_ingest(source, cfg, seed=3)
    assert again == result  # a pure function of the files and the config


def test_split_counts_reject_the_rest_and_name_each_file(source: Path) -> None:
    cfg = IngestConfig(labels="folder", drop_labels=[], splits=SplitConfig(counts=[20, 10, 10]))
    result = run_ingest(source, cfg, seed=0)
    assert Counter(r.split for r in result.records) == {"train": 20, "val": 10, "test": 10}
    assert len(result.rejects) == 20
    assert all(
        isinstance(r, Reject) and "outside the requested split counts" in r.reason for r in result.rejects
    )
    assert {r.path for r in result.rejects}.isdisjoint(r.rel for r in result.records)


def test_unreadable_inputs_become_rejects_with_their_path(source: Path, tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "notes.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="no usable images"):
        run_ingest(tmp_path, IngestConfig(), seed=0)
    good = next(source.rglob("*.png"))
    (tmp_path / "a" / "good.png").write_bytes(good.read_bytes())
    result = run_ingest(tmp_path, IngestConfig(), seed=0)
    assert [r.rel for r in result.records] == ["a/good.png"]
    assert [r.path for r in result.rejects] == ["a/notes.png"] and result.rejects[0].reason
    assert result.seen == 2


def test_dropped_labels_use_none_of_the_label_fraction_quota(source: Path) -> None:
    """drop_labels removes a class before the label fractions are drawn: the smallest fraction holds its quota
    of the kept images only (one per kept class at least) and no dropped image. (It held on main already:
    discover rejects a dropped class before the splits and fractions are drawn; this guards it.)"""
    kept = IngestConfig(labels="folder", drop_labels=[], splits=SplitConfig(label_fractions=[0.05, 1.0]))
    full = run_ingest(source, kept, seed=0)
    dropped_class = Counter(r.label for r in full.records).most_common(1)[0][0]
    cfg = dataclasses.replace(kept, drop_labels=[dropped_class])
    result = run_ingest(source, cfg, seed=0)
    assert dropped_class not in {r.label for r in result.records} | set(result.class_names)
    train = [r for r in result.records if r.split == "train" and r.label]
    small = [r for r in train if 0.05 in r.fractions]
    assert len(small) == max(round(0.05 * len(train)), len(result.class_names))
    assert {r.label for r in small} == set(result.class_names)
