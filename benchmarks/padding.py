"""What static visible-token shapes cost: encoder token slots of border-aware MAE batches when each batch's rows
are padded to

- ``per-batch widest``: the batch's own widest keep count (before issue 24: read on the host, a graph break
  and a new compiled shape per distinct length);
- ``bin maximum``: ``keep_width(L, r)``, the largest keep count of the bin's grid (one static shape per bin:
  what ``radstream.train.masking`` does);
- ``S sizes per bin``: the smallest of ``S`` fixed widths (K·j/S, j = 1..S) that holds the batch's widest
  (a few static shapes per bin; the width would have to be chosen on the host from the foreground boxes);

against ``packed`` (no padding at all). Slots include CLS; the encoder's linear layers cost in proportion to the
slots, attention to their square. No model runs: the count is exact and takes seconds.

Two sets of batches: the synthetic corpus (``radstream.ingest.synth``) built into shards with smart bins and read by the
loader (training crops included), and the synthetic radiographs of ``benchmarks/train_step.py`` (the GPU
benchmark's sizes: smart bins of at most 196 patches, token-budget batches of 256 images per 196 patches).

    python benchmarks/padding.py
    python benchmarks/padding.py --shards OUT --batch 64
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import train_step as ts  # noqa: E402

from radstream.shards.images import unit_float  # noqa: E402
from radstream.train.masking import background_patches, keep_width  # noqa: E402

PATCH = 16
RATIO = 0.75
THRESHOLD = 0.02  # the recipes' border_threshold


def keep_counts(images: torch.Tensor, boxes: torch.Tensor) -> tuple[np.ndarray, int]:
    """Each image's visible patches under border-aware masking, and the grid's patch count L."""
    background = background_patches(images, PATCH, THRESHOLD, boxes=boxes)
    keepable = (~background).sum(dim=1).double()
    counts = (keepable * (1 - RATIO)).long().clamp_min(1)  # random_masking's count
    return counts.numpy(), background.shape[1]


def slots(batches: Iterable[tuple[torch.Tensor, torch.Tensor]], sizes: tuple[int, ...]) -> dict[str, float]:
    """Encoder slots per image (CLS included) of every padding rule, summed over ``batches``."""
    total: dict[str, float] = {"packed": 0.0, "per-batch widest": 0.0, "bin maximum": 0.0}
    total.update({f"{s} sizes per bin": 0.0 for s in sizes})
    images = 0
    for imgs, boxes in batches:
        counts, length = keep_counts(imgs, boxes)
        n, widest, k = len(counts), int(counts.max()), keep_width(length, RATIO)
        images += n
        total["packed"] += float((counts + 1).sum())
        total["per-batch widest"] += n * (widest + 1)
        total["bin maximum"] += n * (k + 1)
        for s in sizes:
            width = min(w for w in (math.ceil(k * j / s) for j in range(1, s + 1)) if w >= widest)
            total[f"{s} sizes per bin"] += n * (width + 1)
    return {name: value / images for name, value in total.items()} | {"images": images}


def corpus_batches(root: Path, batch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """One training epoch of the loader over a shard dataset (augmented, as training sees it)."""
    from radstream.shards.loader import build_loader
    from radstream.shards.loader_config import LoaderConfig

    loader = build_loader(LoaderConfig(backend="torch", batch_size=batch, num_workers=0), root, "train")
    for b in loader:
        yield unit_float(b["image"]), b["foreground"]


def radiograph_batches(images: int, batch: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """``benchmarks/train_step.py``'s radiographs in smart bins, token-budget batches."""
    for b in ts.make_batches(ts.synthetic_radiographs(images, seed=0), "smart", batch, torch.device("cpu")):
        yield b["image"], b["foreground"]


def build_corpus(tmp: Path, images: int) -> Path:
    """The synthetic corpus in smart bins (3 bins of at most 196 patches), as ``make demo`` builds it."""
    from radstream.core.config import load_config
    from radstream.ingest.synth import synthesize
    from radstream.shards.builder.config import BuildConfig
    from radstream.shards.builder.finalize import finalize
    from radstream.shards.builder.parts import run_build

    synthesize(tmp / "synth", n=images, seed=0, max_side=512)
    overrides = [f"source={tmp / 'synth' / 'images'}", f"out={tmp / 'shards'}", "ingest.labels=folder",
                 "binning.strategy=smart", "binning.num_bins=3", "binning.max_tokens=196"]  # fmt: skip
    cfg = load_config(BuildConfig, None, overrides)
    run_build(cfg)
    finalize(cfg)
    return tmp / "shards"


def report(rows: dict[str, dict[str, float]]) -> str:
    names = [k for k in next(iter(rows.values())) if k != "images"]
    head = ["batches", "images", *[f"{n} (slots/img)" for n in names]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for source, r in rows.items():
        cells = [source, str(int(r["images"])), *[f"{r[n]:.1f}" for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for source, r in rows.items():
        over = ", ".join(f"{n} {r[n] / r['packed']:.2f}x" for n in names if n != "packed")
        lines.append(f"{source}: slots against packed: {over}; bin maximum against per-batch widest "
                     f"{r['bin maximum'] / r['per-batch widest']:.2f}x")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--shards", type=Path, default=None, help="a shard dataset (default: build the synth corpus)"
    )
    p.add_argument("--images", type=int, default=400, help="synthetic images of each set")
    p.add_argument("--batch", type=int, default=32, help="the loader's batch size on the corpus")
    p.add_argument("--gpu-batch", type=int, default=256, help="images per 196-patch batch of the radiographs")
    p.add_argument("--sizes", type=int, nargs="+", default=[2, 4], help="fixed sizes per bin to compare")
    args = p.parse_args(argv)
    sizes = tuple(args.sizes)
    rows = {}
    with tempfile.TemporaryDirectory(prefix="padding_") as tmp:
        root = args.shards or build_corpus(Path(tmp), args.images)
        rows[f"synthetic corpus, loader batch {args.batch}"] = slots(corpus_batches(root, args.batch), sizes)
    for batch in (args.batch, args.gpu_batch):
        images = max(args.images, 4 * batch)
        rows[f"train_step radiographs, batch {batch}"] = slots(radiograph_batches(images, batch), sizes)
    print(f"border-aware masking, mask ratio {RATIO}, patch {PATCH}, threshold {THRESHOLD}")
    print(report(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
