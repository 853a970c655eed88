"""Configuration of the ingest stage: where images come from, how they are labelled, grouped, read and split."""

from __future__ import annotations

from dataclasses import dataclass, field

from radstream.ingest.privacy import PrivacyConfig
from radstream.ingest.readers import ReadConfig
from radstream.ingest.sources import LABEL_SOURCES

PATIENT_SOURCES = ("auto", "dicom", "parent", "file")


@dataclass(frozen=True)
class SplitConfig:
    """How images are divided into train/val/test and nested label fractions."""

    counts: list[int] | None = None
    """Exact [train, val, test] image counts (the study: 8000, 2000, 2600); images beyond them are rejected as
    'outside the requested split counts'. Overrides `fractions` when given."""
    fractions: list[float] = field(default_factory=lambda: [0.7, 0.15, 0.15])
    """[train, val, test] shares of the images, used when `counts` is not given; must sum to 1."""
    label_fractions: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    """Nested subsets of the labelled train split (the study's 1% regime is 80 images); stored per sample."""

    def __post_init__(self) -> None:
        if self.counts is not None and (len(self.counts) != 3 or min(self.counts) < 0):
            raise ValueError(f"splits.counts must be three non-negative integers, got {self.counts}")
        if len(self.fractions) != 3 or abs(sum(self.fractions) - 1.0) > 1e-6 or min(self.fractions) < 0:
            raise ValueError(f"splits.fractions must be three shares summing to 1, got {self.fractions}")
        if not self.label_fractions or any(not 0 < f <= 1 for f in self.label_fractions):
            raise ValueError(f"splits.label_fractions must lie in (0, 1], got {self.label_fractions}")


@dataclass(frozen=True)
class IngestConfig:
    """Where the images come from and how they are labelled, grouped and read."""

    manifest_csv: str | None = None
    """A CSV manifest (columns: path, and optionally label, irma_code, patient_id) instead of a folder scan; a
    relative `path` is read from the CSV's own folder."""
    labels: str = "none"
    """Label source: none (unlabeled, pretraining only), folder (first folder level), csv (manifest `label`
    column) or irma (IRMA code → body region, from the manifest's `irma_code` column or `irma_csv`)."""
    irma_csv: str | None = None
    """IRMA code list (`image_id;irma_code`, image_id = file stem), for labels=irma with a folder source."""
    drop_labels: list[str] = field(default_factory=lambda: ["whole_body"])
    """Classes rejected at ingest; the study drops 'whole body' (3 images)."""
    patient_from: str = "auto"
    """Patient id source when the manifest has none: auto (DICOM PatientID, else the file), dicom, parent
    (the file's folder name) or file (every file its own patient)."""
    read: ReadConfig = field(default_factory=ReadConfig)
    """Decoding and normalisation of each image."""
    splits: SplitConfig = field(default_factory=SplitConfig)
    """Patient-grouped, class-stratified splits and label fractions."""
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    """Keyed pseudonyms instead of patient ids and source paths (on by default; see ``ingest.privacy``)."""

    def __post_init__(self) -> None:
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"ingest.labels must be one of {LABEL_SOURCES}, got {self.labels!r}")
        if self.patient_from not in PATIENT_SOURCES:
            raise ValueError(
                f"ingest.patient_from must be one of {PATIENT_SOURCES}, got {self.patient_from!r}"
            )
