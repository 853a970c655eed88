"""Embed every split once with the frozen MAE encoder into a zarr store (``radstream.eval.embed_store``).

    accelerate launch -m radstream.eval.embed --checkpoint RUN/checkpoints/latest --shards OUT --out EMB.zarr \\
        [--splits train,val,test] [--pool-grid auto] [loader.batch_size=128 ...]

No masking, eval mode, stored pixels (no augmentation). Per sample three aggregations of the encoder's tokens
``[1+L, D]`` (CLS first) are stored in float16:

- ``cls``: the CLS token, ``[D]``;
- ``mean``: the mean of the L patch tokens, ``[D]``;
- ``flattened``: the concatenation of all patch tokens, position-major (row, column, then channel):
  ``[h*w*D]``. With one bin shape (the study's fixed 224×224) that is the native 196·D vector, the study's
  "flattened". A linear head needs one length, so with several bin shapes every token grid is resampled
  (bilinear, antialiased) to the grid of the most common bin (by samples) — the most faithful stand-in for a
  concatenation, far from an average pool — and the store names it, e.g. "flattened (resampled to 14×14)".
  ``--pool-grid`` (default ``auto``) forces a grid ("HxW") or, ``none``, the native grid of a one-shape
  dataset.

Every rank embeds the batches its loader gives it; padding repeats (``valid`` False) are skipped. See
``radstream.eval.embed_store`` for how ranks write disjoint rows and how a rerun resumes.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import MISSING

from radstream.core.config import to_dict
from radstream.core.progress import progress
from radstream.eval import embed_store
from radstream.eval.embed_store import SplitRows, StagingWriter
from radstream.shards.images import unit_float
from radstream.shards.loader_config import LoaderConfig
from radstream.train.checkpoint import load_encoder
from radstream.train.entry import EXIT_OK, Flag, stage_main
from radstream.train.mae import MAE

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedConfig:
    """``radstream.eval.embed``: which encoder, which data, where the embeddings go."""

    checkpoint: str = MISSING
    """An MAE run folder (the weights of the run: ``best/``, else its latest checkpoint; ``radstream.train.run_layout``),
    ``RUN/best``, a ``step-N`` folder or ``RUN/checkpoints/latest`` (the pointer file)."""
    shards: str = MISSING
    """Root of a finalized shard dataset."""
    out: str = MISSING
    """The zarr store to write (resumed when it exists and came from the same checkpoint)."""
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    """Splits to embed; splits without samples are skipped."""
    pool_grid: str = "auto"
    """Token grid of the ``flattened`` aggregation: "auto" (the native grid with one bin shape, else every
    grid resampled to the most common bin's), "HxW" (every grid resampled to it) or "none" (the native grid;
    one bin shape only)."""
    chunk_rows: int = 1024
    """Rows per zarr chunk (and per resumable unit)."""
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    """The evaluation loader (never augments; ``label_fraction`` is ignored: every sample is embedded)."""
    mixed_precision: str = "no"
    """"no", "fp16" or "bf16" autocast for the encoder."""
    cpu: bool = False
    """Force the CPU even where a GPU is present."""

    def __post_init__(self) -> None:
        for name in ("checkpoint", "shards", "out"):
            if not getattr(self, name) or getattr(self, name) == MISSING:
                raise ValueError(f"{name} is required")
        parse_grid(self.pool_grid)
        if self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1, got {self.chunk_rows}")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")


def parse_grid(text: str) -> tuple[int, int] | None:
    """ "4x4" -> (4, 4); "none" and "auto" -> None (decided from the dataset's bins by ``flattened_grid``)."""
    if text.lower() in ("none", "auto"):
        return None
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"pool grid must look like 4x4 or be auto or none, got {text!r}")
    return int(parts[0]), int(parts[1])


def aggregate_tokens(
    tokens: torch.Tensor, grid_hw: tuple[int, int], pool_grid: tuple[int, int] | None
) -> dict[str, torch.Tensor]:
    """tokens: [N, 1+L, D] (CLS first) -> {"cls": [N, D], "mean": [N, D], "flattened": [N, gh*gw*D]} float32.

    ``flattened`` concatenates the (h, w) token grid, position-major, after resampling it (bilinear,
    antialiased) to ``pool_grid`` when that is another grid (None: the native grid).
    """
    tokens = tokens.float()
    patches = tokens[:, 1:]
    n, length, dim = patches.shape
    h, w = grid_hw
    if h * w != length:
        raise ValueError(f"{length} patch tokens do not form a {h}x{w} grid")
    if pool_grid is None or tuple(pool_grid) == (h, w):
        flat = patches.reshape(n, length * dim)
    else:
        grid = patches.transpose(1, 2).reshape(n, dim, h, w)
        resampled = F.interpolate(
            grid, size=tuple(pool_grid), mode="bilinear", align_corners=False, antialias=True
        )
        flat = resampled.permute(0, 2, 3, 1).reshape(n, -1)  # [N, gh*gw*D]
    return {"cls": tokens[:, 0], "mean": patches.mean(dim=1), "flattened": flat}


def flattened_grid(pool_grid: str, bins: Sequence[dict], patch: int) -> tuple[tuple[int, int], str]:
    """The token grid of the ``flattened`` aggregation and the name that says how it was made.

    Args:
        pool_grid: ``EmbedConfig.pool_grid``. bins: the manifest's bins (height, width, counts per split).
        patch: the encoder's patch size.

    Raises:
        ValueError: "none" with several bin shapes.
    """
    sizes: dict[tuple[int, int], int] = {}
    for b in bins:  # manifest order breaks ties
        shape = (b["height"] // patch, b["width"] // patch)
        sizes[shape] = sizes.get(shape, 0) + sum(b["counts"].values())
    if pool_grid.lower() == "none" and len(sizes) != 1:
        raise ValueError(f"--pool-grid none needs one bin shape; the dataset has grids {sorted(sizes)}")
    grid = parse_grid(pool_grid) or max(sizes, key=sizes.get)
    resampled = set(sizes) != {grid}
    return grid, f"flattened ({'resampled to ' if resampled else ''}{grid[0]}×{grid[1]})"


def fraction_matrix(fractions: Sequence[Sequence[float]], levels: Sequence[float]) -> np.ndarray:
    """bool [N, F]: sample i is in label fraction ``levels[j]`` (float-tolerant)."""
    out = np.zeros((len(fractions), len(levels)), dtype=bool)
    for i, fr in enumerate(fractions):
        for j, level in enumerate(levels):
            out[i, j] = any(abs(f - level) < 1e-9 for f in fr)
    return out


def split_rows(shards: str | Path, split: str, levels: Sequence[float]) -> SplitRows:
    """The split's keys, labels and fraction matrix in samples-table order."""
    from radstream.shards.manifest import read_samples

    table = read_samples(shards, split, columns=["key", "split", "label_index", "fractions"])
    return SplitRows(
        keys=[str(k) for k in table["key"].to_pylist()],
        labels=np.asarray(table["label_index"].to_numpy(), dtype=np.int64),
        fractions=fraction_matrix(table["fractions"].to_pylist(), levels),
    )


@torch.no_grad()
def embed_batches(
    model: MAE,
    batches: Iterable[dict],
    writer: StagingWriter,
    rows: SplitRows,
    pool_grid: tuple[int, int] | None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> None:
    """Phase 1 of one rank: embed ``batches`` (already positioned after ``writer.batches_done``) into staging.

    ``autocast`` makes the mixed-precision context (``accelerator.autocast``).

    Raises:
        ValueError: a batch key or label that does not match the samples table.
    """
    row_of = {k: i for i, k in enumerate(rows.keys)}
    for batch in batches:
        valid = batch["valid"].bool().cpu().numpy()
        if not valid.any():
            writer.skip()
            continue
        keys = [k for k, v in zip(batch["key"], valid, strict=True) if v]
        missing = [k for k in keys if k not in row_of]
        if missing:
            raise ValueError(f"loader key {missing[0]!r} is not in the samples table")
        idx = np.array([row_of[k] for k in keys], dtype=np.int64)
        labels = batch["label"].cpu().numpy()[valid]
        if not np.array_equal(labels, rows.labels[idx]):
            raise ValueError(f"loader labels differ from the samples table (batch of {keys[0]!r})")
        feats = batch_features(model, batch, pool_grid, autocast)
        writer.add(idx, {k: v.cpu().numpy() for k, v in feats.items()})
    writer.flush(finished=True)


def batch_features(
    model: MAE,
    batch: dict,
    pool_grid: tuple[int, int] | None,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
) -> dict[str, torch.Tensor]:
    """The aggregated embeddings (``aggregate_tokens``) of a loader batch's valid images.

    The encoder runs on the whole batch and the padding repeats are dropped from its output, not from its
    input: every batch of a bin then has the bin's one shape (one compiled graph per bin, no shape that
    depends on how many repeats a batch holds).
    """
    images = unit_float(batch["image"])
    with autocast():
        tokens = model.forward_features(images)
    valid = batch["valid"].bool().to(tokens.device)
    return aggregate_tokens(tokens[valid], model.grid(images), pool_grid)


def store_meta(cfg: EmbedConfig, model: MAE, config: dict, folder: Path) -> dict:
    """The store's attrs: source checkpoint and its config, data, aggregations and their widths."""
    from radstream.shards.manifest import read_manifest

    manifest = read_manifest(cfg.shards)
    grid, label = flattened_grid(cfg.pool_grid, manifest["bins"], model.patch_size)
    dim = model.encoder.embed_dim
    levels = sorted(float(f) for f in manifest["config"]["ingest"]["splits"]["label_fractions"])
    return {
        "checkpoint": str(folder.resolve()),
        "checkpoint_config": config,
        "shards": str(Path(cfg.shards).resolve()),
        "class_names": list(manifest.get("class_names") or []),
        "label_fractions": levels,
        "aggregations": list(embed_store.AGGREGATIONS),
        "dims": {"cls": dim, "mean": dim, "flattened": grid[0] * grid[1] * dim},
        "embed_dim": dim,
        "pool_grid": list(grid),
        "aggregation_labels": {"flattened": label},
        "patch_size": model.patch_size,
        "embed_config": to_dict(cfg),
    }


def _embed_rank(cfg: EmbedConfig, accelerator, model: MAE, split: str, rows: SplitRows) -> None:
    """Phase 1 on this rank: the split's batches from this rank's loader, resumed after the stored ones."""
    from radstream.shards.loader import build_loader

    loader_cfg = replace(cfg.loader.for_run(0), label_fraction=None)
    rank, world = accelerator.process_index, accelerator.num_processes
    loader = build_loader(
        loader_cfg,
        cfg.shards,
        split,
        process_index=rank,
        num_processes=world,
        device=accelerator.device,
        train=False,
    )
    with loader:
        plan = {
            "steps": len(loader),
            "seed": loader_cfg.seed,
            "batch_size": loader_cfg.batch_size,
            "token_budget": loader_cfg.token_budget,
        }
        writer = StagingWriter(cfg.out, split, rank, world, plan)
        if writer.finished:
            return
        loader.load_state_dict({"epoch": 0, "step": writer.batches_done})
        bar = progress(
            loader,
            total=len(loader),
            initial=writer.batches_done,
            desc=f"embed {split}",
            unit="img",
            unit_scale=loader_cfg.batch_size
            * world,  # images of all ranks (at most; a bin's tail is smaller)
            main_process=accelerator.is_main_process,
        )
        grid = tuple(embed_store.read_attrs(cfg.out)["pool_grid"])
        embed_batches(model, bar, writer, rows, grid, accelerator.autocast)


def run(cfg: EmbedConfig) -> Path:
    """Embed ``cfg.splits`` into ``cfg.out``; every rank of an ``accelerate launch`` calls it.

    Returns:
        The store's path.
    """
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=cfg.cpu, mixed_precision=cfg.mixed_precision)
    if not accelerator.is_main_process:
        logging.getLogger().setLevel(logging.WARNING)  # one log, from the main process
    main_process = accelerator.is_main_process
    model, config, folder = load_encoder(cfg.checkpoint)
    model.to(accelerator.device)
    meta = store_meta(cfg, model, config, folder)
    if main_process:
        embed_store.create_store(cfg.out, meta)
    accelerator.wait_for_everyone()
    for split in cfg.splits:
        if embed_store.split_complete(cfg.out, split):
            logger.info("embed %s: already complete in %s, skipped", split, cfg.out)
            continue
        rows = split_rows(cfg.shards, split, meta["label_fractions"])
        if not rows.keys:
            logger.warning("embed %s: no samples in %s, skipped", split, cfg.shards)
            continue
        if main_process:
            embed_store.prepare_split(cfg.out, split, rows, cfg.chunk_rows, accelerator.num_processes)
        accelerator.wait_for_everyone()
        _embed_rank(cfg, accelerator, model, split, rows)
        accelerator.wait_for_everyone()
        embed_store.assemble_split(cfg.out, split, accelerator.process_index, accelerator.num_processes)
        accelerator.wait_for_everyone()
        if main_process:
            embed_store.finish_split(cfg.out, split)
            logger.info("embed %s: %d samples written to %s", split, len(rows.keys), cfg.out)
        accelerator.wait_for_everyone()
    return Path(cfg.out)


FLAGS = (
    Flag(
        "--checkpoint",
        "checkpoint",
        "RUN/checkpoints/latest, RUN/best, a step-N or run folder",
        required=True,
    ),
    Flag("--shards", "shards", "finalized shard dataset", required=True),
    Flag("--out", "out", "zarr store to write (EMB.zarr)", required=True),
    Flag("--splits", "splits", "comma-separated splits (default train,val,test)", template="[{}]"),
    Flag(
        "--pool-grid",
        "pool_grid",
        "token grid of the flattened aggregation: auto (default), e.g. 14x14, or none",
    ),
)
"""The command line's own flags (as README.md, radstream demo and slurm/ use them), each a config key."""


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: ``accelerate launch -m radstream.eval.embed --checkpoint CKPT --shards OUT --out EMB.zarr ...``."""
    return stage_main(
        argv,
        prog="radstream.eval.embed",
        description=__doc__.splitlines()[0],
        config_cls=EmbedConfig,
        run=_run_stage,
        example_recipe="a YAML of EmbedConfig keys",
        example_override="loader.batch_size=128",
        flags=FLAGS,
    )


def _run_stage(cfg: EmbedConfig) -> int:
    run(cfg)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
