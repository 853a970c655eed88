"""Configuration of the shard build: ingest (sources, labels, splits) + binning + shard encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from bucketing.bins import BinningConfig
from ingest.readers import ReadConfig

LABEL_SOURCES = ("none", "folder", "csv", "irma")
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
    """A CSV manifest (columns: path, and optionally label, irma_code, patient_id) instead of a folder scan."""
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

    def __post_init__(self) -> None:
        if self.labels not in LABEL_SOURCES:
            raise ValueError(f"ingest.labels must be one of {LABEL_SOURCES}, got {self.labels!r}")
        if self.patient_from not in PATIENT_SOURCES:
            raise ValueError(
                f"ingest.patient_from must be one of {PATIENT_SOURCES}, got {self.patient_from!r}"
            )


@dataclass(frozen=True)
class ShardConfig:
    """How samples are encoded and grouped into tar shards."""

    codec: str = "jpg"
    """Image codec in the tars: jpg (8-bit, GPU-decodable), png (8-bit lossless), png16 (16-bit lossless) or
    jp2 (16-bit lossless JPEG 2000, GPU-decodable). The default was chosen by benchmarks/codecs.py."""
    quality: int = 95
    """JPEG quality (jpg only)."""
    max_samples_per_shard: int = 2000
    """A new tar starts after this many samples."""
    max_shard_bytes: int = 256 * 1024 * 1024
    """A new tar starts before it would grow past this many bytes."""
    part_size: int = 10000
    """Images per build part. The input is cut into parts (whole patients, independent of the number of
    tasks); a part is the unit of parallel tasks, of resumption and of the `<task>` field in shard names."""
    crop_to_foreground: bool = False
    """Crop uniform borders (the foreground box) before resizing to the bin; off keeps the study's whole image."""

    def __post_init__(self) -> None:
        from shards.codecs import CODECS

        if self.codec not in CODECS:
            raise ValueError(f"shards.codec must be one of {sorted(CODECS)}, got {self.codec!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"shards.quality must be in 1..100, got {self.quality}")
        if self.max_samples_per_shard < 1 or self.max_shard_bytes < 1 or self.part_size < 1:
            raise ValueError("shards.max_samples_per_shard, max_shard_bytes and part_size must be positive")


@dataclass(frozen=True)
class BuildConfig:
    """`radstream build-shards`: the whole offline build."""

    source: str = ""
    """Folder tree of DICOM / PNG / JPEG / TIFF files (recursive), or the folder a manifest's paths are relative to."""
    out: str = ""
    """Output dataset folder."""
    ingest: IngestConfig = field(default_factory=IngestConfig)
    binning: BinningConfig = field(default_factory=BinningConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    seed: int = 0
    """One seed for splits, fractions, part assignment and sample order: same seed, same bytes."""
    workers: int = 1
    """Worker processes that decode, resize and encode."""

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
