"""`radstream bins`: the bin plan of a source folder (planned now) or of a built shard dataset (as written)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from radstream.bucketing.bins import Bin, BinningConfig, assign_with_config, plan_bins, plan_report
from radstream.core.config import load_config


def _binning_overrides(overrides: Sequence[str]) -> list[str]:
    """Accept both ``binning.strategy=strict`` and ``strategy=strict``."""
    return [o.removeprefix("binning.") for o in overrides]


def _dataset_report(root: Path, batch_size: int) -> str:
    from radstream.shards.manifest import read_manifest, read_samples

    manifest = read_manifest(root)
    cfg = BinningConfig(**manifest["binning"])
    table = read_samples(root, columns=["bin", "height", "width"]).to_pydict()
    bins = [Bin.parse(b["name"]) for b in manifest["bins"]]
    index = {b.name: i for i, b in enumerate(bins)}
    sizes = np.column_stack([table["height"], table["width"]])
    assignment = np.array([index[b] for b in table["bin"]], dtype=np.int64)
    report = plan_report(sizes, bins, assignment, cfg.patch_size, batch_size, cfg.fit)
    return f"shard dataset {root} (strategy {cfg.strategy}, as written)\n{report.to_text()}"


def _source_sizes(source: Path, workers: int) -> np.ndarray:
    from radstream.ingest.pipeline import scan_sources
    from radstream.ingest.readers import ReadConfig
    from radstream.ingest.sources import discover

    items, _ = discover(str(source))
    heads = [h for h, _ in scan_sources(items, ReadConfig(), workers) if h is not None]
    return np.array([[h.height, h.width] for h in heads], dtype=np.int64).reshape(-1, 2)


def _compare_line(name: str, cfg: BinningConfig, sizes: np.ndarray, batch_size: int) -> str:
    bins = plan_bins(cfg, sizes)
    rep = plan_report(sizes, bins, assign_with_config(cfg, sizes, bins), cfg.patch_size, batch_size, cfg.fit)
    return (
        f"{name:>7}: {len(bins):>5} bins, {rep.mean_tokens:6.1f} tokens/image, distortion "
        f"{rep.mean_distortion:.3f}, {rep.stranded_images} images in bins that never fill a batch of {batch_size}"
    )


def bins_report(
    path: str | Path, overrides: Sequence[str] = (), batch_size: int = 64, workers: int = 1
) -> str:
    """A readable bin report; for a source folder also a one-line comparison of the three strategies."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return _dataset_report(path, batch_size)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: neither a source folder nor a shard dataset")
    cfg = load_config(BinningConfig, None, _binning_overrides(overrides))
    sizes = _source_sizes(path, workers)
    if not len(sizes):
        raise ValueError(f"{path}: no readable images")
    bins = plan_bins(cfg, sizes)
    report = plan_report(
        sizes, bins, assign_with_config(cfg, sizes, bins), cfg.patch_size, batch_size, cfg.fit
    )
    lines = [
        f"source {path}: {len(sizes)} images, strategy {cfg.strategy}",
        report.to_text(),
        "",
        "strategies compared:",
    ]
    for strategy in ("fixed", "strict", "smart"):
        lines.append(_compare_line(strategy, dataclasses.replace(cfg, strategy=strategy), sizes, batch_size))
    return "\n".join(lines)
