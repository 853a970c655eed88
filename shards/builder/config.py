"""Configuration of the shard build: ingest (``radstream.ingest.config``) + binning + shard encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from radstream.bucketing.bins import BinningConfig
from radstream.ingest.config import IngestConfig


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
        from radstream.shards.codecs import CODECS

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
    """Folder tree of DICOM / PNG / JPEG / TIFF files (recursive), or a CSV manifest. With
    `ingest.manifest_csv`, the folder that sample names and folder labels are relative to (the manifest's own
    relative paths are read from the CSV's folder)."""
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
