"""Embedding store: aggregation, zarr roundtrip, alignment with the samples table, disjoint ranks, resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from radstream.core.config import load_config, to_yaml
from radstream.eval import embed_store
from radstream.eval.embed import (
    EmbedConfig,
    aggregate_tokens,
    embed_batches,
    flattened_grid,
    parse_grid,
    run,
    split_rows,
)
from radstream.eval.embed_store import SplitRows, StagingWriter
from radstream.shards.images import unit_float
from radstream.shards.loader import build_loader
from radstream.shards.loader_config import LoaderConfig
from radstream.shards.manifest import read_samples
from radstream.train.checkpoint import load_encoder
from tests.accelerate_state import reset_accelerate

DIMS = {"cls": 2, "mean": 2, "flattened": 3}
RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "debug.yaml"


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it after each test."""
    yield
    reset_accelerate()


def feats_of(rows: np.ndarray) -> dict[str, np.ndarray]:
    """Embeddings that encode their row, so any misplaced row shows."""
    r = np.asarray(rows, dtype=np.float32)[:, None]
    return {name: np.repeat(r, dim, axis=1) + np.arange(dim) / 8 for name, dim in DIMS.items()}


def new_store(path: Path, n: int, chunk_rows: int, world: int) -> SplitRows:
    rows = SplitRows(
        keys=[f"k{i:03d}" for i in range(n)],
        labels=np.arange(n) % 3 - (np.arange(n) == 5),  # one unlabeled row (-1)
        fractions=np.stack([np.arange(n) % 4 == 0, np.ones(n, bool)], axis=1),
    )
    meta = {"checkpoint": "ck", "aggregations": list(DIMS), "dims": DIMS, "label_fractions": [0.25, 1.0]}
    embed_store.create_store(path, meta)
    embed_store.prepare_split(path, "train", rows, chunk_rows, world)
    return rows


def rank_batches(n: int, world: int, batch: int) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Per rank a list of (rows, valid) batches: a shuffled split of 0..n-1, padded by repeats to full batches."""
    order = np.random.default_rng(0).permutation(n)
    per_rank = [order[r::world] for r in range(world)]
    out = []
    for rows in per_rank:
        batches = []
        for lo in range(0, len(rows), batch):
            part = rows[lo : lo + batch]
            pad = batch - len(part)
            batches.append((np.concatenate([part, order[:pad]]), np.arange(batch) < len(part)))
        batches.append((order[:batch], np.zeros(batch, bool)))  # a batch of padding repeats only
        out.append(batches)
    return out


def write_rank(path: Path, rank: int, world: int, batches, stop_after: int | None = None) -> StagingWriter:
    writer = StagingWriter(path, "train", rank, world, {"plan": 1})
    for i, (rows, valid) in enumerate(batches[writer.batches_done :]):
        if stop_after is not None and i == stop_after:
            return writer  # a crash: the buffer is lost, only flushed chunks survive
        if valid.any():
            writer.add(rows[valid], feats_of(rows[valid]))
        else:
            writer.skip()
    writer.flush(finished=True)
    return writer


def test_aggregations_pool_the_grid_and_keep_cls_first() -> None:
    tokens = torch.arange(2 * 7 * 3, dtype=torch.float32).reshape(2, 7, 3)  # CLS + a 2x3 grid, D=3
    out = aggregate_tokens(tokens, (2, 3), (4, 4))
    assert torch.equal(out["cls"], tokens[:, 0])
    assert torch.allclose(out["mean"], tokens[:, 1:].mean(dim=1))
    assert out["flattened"].shape == (2, 16 * 3)
    native = aggregate_tokens(tokens, (2, 3), None)["flattened"]
    assert torch.equal(native, tokens[:, 1:].reshape(2, -1))  # position-major, channels inside
    same = aggregate_tokens(tokens, (2, 3), (2, 3))["flattened"]
    assert torch.allclose(same, native)  # pooling to the grid's own shape changes nothing
    assert parse_grid("4x4") == (4, 4) and parse_grid("none") is None
    with pytest.raises(ValueError):
        parse_grid("4by4")


def test_flattened_is_the_native_concatenation_or_a_resampled_grid() -> None:
    tokens = torch.randn(2, 1 + 4 * 6, 3)  # CLS + a 4x6 grid
    native = aggregate_tokens(tokens, (4, 6), (4, 6))["flattened"]
    assert torch.equal(native, tokens[:, 1:].reshape(2, -1))  # the native grid: a plain concatenation
    # resampled, every position keeps its place: a token coding its (row, column) stays ordered
    rows, cols = torch.meshgrid(torch.arange(4.0), torch.arange(6.0), indexing="ij")
    coded = torch.cat([torch.zeros(1, 1, 2), torch.stack([rows, cols], -1).reshape(1, 24, 2)], dim=1)
    half = aggregate_tokens(coded, (4, 6), (2, 3))["flattened"].reshape(2, 3, 2)
    assert (half[1, :, 0] > half[0, :, 0]).all() and (half[:, 1:, 1] > half[:, :-1, 1]).all()
    flat = aggregate_tokens(torch.ones(1, 25, 2), (4, 6), (2, 3))["flattened"]
    assert torch.allclose(flat, torch.ones_like(flat))  # a constant grid stays constant

    def bins(*shapes):
        return [{"height": h, "width": w, "counts": {"train": n, "val": 1, "test": 1}} for h, w, n in shapes]

    one = bins((224, 224, 50))
    assert flattened_grid("auto", one, 16) == ((14, 14), "flattened (14×14)")
    assert flattened_grid("none", one, 16) == ((14, 14), "flattened (14×14)")
    several = bins((224, 224, 5), (256, 192, 40), (192, 256, 10))
    assert flattened_grid("auto", several, 16) == ((16, 12), "flattened (resampled to 16×12)")
    assert flattened_grid("4x4", one, 16) == ((4, 4), "flattened (resampled to 4×4)")
    with pytest.raises(ValueError, match="one bin shape"):
        flattened_grid("none", several, 16)


@pytest.mark.parametrize("world", [1, 3])
def test_ranks_write_disjoint_chunks_and_the_union_is_complete(tmp_path: Path, world: int) -> None:
    path, n, chunk = tmp_path / "emb.zarr", 23, 4
    rows = new_store(path, n, chunk, world)
    for rank, batches in enumerate(rank_batches(n, world, batch=3)):
        write_rank(path, rank, world, batches)
    assert not embed_store.split_complete(path, "train")
    written = [embed_store.assemble_split(path, "train", rank, world) for rank in range(world)]
    n_chunks = -(-n // chunk)
    assert written == [len(range(r, n_chunks, world)) for r in range(world)]  # chunk c belongs to rank c % W
    assert [embed_store.assemble_split(path, "train", r, world) for r in range(world)] == [
        0
    ] * world  # resumed
    embed_store.finish_split(path, "train")
    assert embed_store.split_complete(path, "train")
    back = embed_store.read_split(path, "train")
    assert back.keys == rows.keys
    assert np.array_equal(back.labels, rows.labels)
    assert np.array_equal(back.fractions, rows.fractions)
    expected = feats_of(np.arange(n))
    for name in DIMS:
        assert back.features[name].dtype == np.float32
        np.testing.assert_array_equal(back.features[name], expected[name].astype(np.float16))


def test_missing_or_twice_embedded_rows_fail_loudly(tmp_path: Path) -> None:
    path = tmp_path / "emb.zarr"
    new_store(path, 10, 4, 2)
    write_rank(path, 0, 2, [(np.arange(0, 5), np.ones(5, bool))])
    write_rank(path, 1, 2, [(np.arange(4, 9), np.ones(5, bool))])  # row 4 twice, row 9 never
    with pytest.raises(RuntimeError, match="more than one rank"):
        embed_store.assemble_split(path, "train", 0, 2)
    path2 = tmp_path / "emb2.zarr"
    new_store(path2, 10, 4, 2)
    write_rank(path2, 0, 2, [(np.arange(0, 5), np.ones(5, bool))])
    write_rank(path2, 1, 2, [(np.arange(5, 9), np.ones(4, bool))])
    with pytest.raises(RuntimeError, match="never embedded.*k009"):
        embed_store.assemble_split(path2, "train", 1, 2)
    with pytest.raises(ValueError, match="unfinished"):
        embed_store.read_split(path2, "train")


def test_staging_resumes_after_a_crash(tmp_path: Path) -> None:
    path, n = tmp_path / "emb.zarr", 20
    new_store(path, n, 4, 1)
    (batches,) = rank_batches(n, 1, batch=3)
    crashed = write_rank(path, 0, 1, batches, stop_after=5)  # 15 rows seen, 12 flushed (3 whole chunks)
    assert not crashed.finished
    resumed = StagingWriter(path, "train", 0, 1, {"plan": 1})
    assert 0 < resumed.batches_done < 5
    assert resumed.group["rows"].shape[0] == 12
    write_rank(path, 0, 1, batches)
    embed_store.assemble_split(path, "train", 0, 1)
    embed_store.finish_split(path, "train")
    np.testing.assert_array_equal(embed_store.read_split(path, "train").features["mean"][:, 0], np.arange(n))


def test_another_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "emb.zarr"
    new_store(path, 5, 4, 1)
    with pytest.raises(ValueError, match="checkpoint"):
        embed_store.create_store(
            path,
            {"checkpoint": "other", "aggregations": list(DIMS), "dims": DIMS, "label_fractions": [0.25, 1.0]},
        )


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory, tiny_shards: Path) -> Path:
    """A checkpoint of the debug MAE written by radstream.train.checkpoint (random weights: no training needed)."""
    from accelerate import Accelerator

    from radstream.train.checkpoint import save_checkpoint
    from radstream.train.config import PretrainConfig
    from radstream.train.mae import build_mae

    run_dir = tmp_path_factory.mktemp("mae_run")
    cfg = load_config(PretrainConfig, RECIPE, [f"shards={tiny_shards}", f"run_dir={run_dir}"])
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(build_mae(cfg.model))
    save_checkpoint(accelerator, run_dir, 3, {"epoch": 1}, to_yaml(cfg), keep_last=1)
    del model
    return run_dir / "checkpoints" / "latest"


def embed_config(tiny_shards: Path, checkpoint: Path, out: Path) -> EmbedConfig:
    loader = ["loader.backend=torch", "loader.batch_size=4", "loader.num_workers=0"]
    return load_config(
        EmbedConfig,
        None,
        [
            f"checkpoint={checkpoint}",
            f"shards={tiny_shards}",
            f"out={out}",
            "cpu=true",
            "chunk_rows=8",
            *loader,
        ],
    )


def test_embed_run_matches_the_samples_table_and_the_encoder(tmp_path, tiny_shards, mae_checkpoint) -> None:
    cfg = dataclasses.replace(
        embed_config(tiny_shards, mae_checkpoint, tmp_path / "emb.zarr"), pool_grid="4x4"
    )
    run(cfg)
    attrs = embed_store.read_attrs(cfg.out)
    assert attrs["checkpoint"].endswith("step-3") and attrs["checkpoint_config"]["model"]["embed_dim"] == 32
    assert attrs["dims"] == {"cls": 32, "mean": 32, "flattened": 16 * 32}
    model, _, _ = load_encoder(mae_checkpoint)
    for split in ("train", "val", "test"):
        table = read_samples(tiny_shards, split).to_pylist()
        back = embed_store.read_split(cfg.out, split)
        assert back.keys == [r["key"] for r in table]
        assert back.labels.tolist() == [r["label_index"] for r in table]
        assert back.fractions.tolist() == [[f in r["fractions"] for f in (0.01, 0.1, 1.0)] for r in table]
    # recompute one batch with the encoder: the stored rows hold exactly these samples' embeddings
    loader = build_loader(
        LoaderConfig(backend="torch", batch_size=4, num_workers=0), tiny_shards, "val", train=False
    )
    batch = next(iter(loader))
    with torch.no_grad():
        images = unit_float(batch["image"])
        feats = aggregate_tokens(model.forward_features(images), model.grid(images), (4, 4))
    back = embed_store.read_split(cfg.out, "val")
    rows = [back.keys.index(k) for k in batch["key"]]
    for name, value in feats.items():
        np.testing.assert_allclose(back.features[name][rows], value.numpy(), atol=2e-3, rtol=2e-3)
    run(cfg)  # a second run finds every split complete and leaves the store as it is
    assert embed_store.read_split(cfg.out, "val").keys == back.keys


def test_two_ranks_with_the_real_loader_equal_one(tmp_path, tiny_shards, mae_checkpoint) -> None:
    """Ranks of the real loader (padding repeats included) assemble the same store as one process."""
    model, _, _ = load_encoder(mae_checkpoint)
    levels = [0.01, 0.1, 1.0]
    stores = {}
    for world in (1, 2):
        path = tmp_path / f"w{world}.zarr"
        rows = split_rows(tiny_shards, "val", levels)
        embed_store.create_store(
            path,
            {
                "checkpoint": "ck",
                "aggregations": ["cls", "mean", "flattened"],
                "dims": {"cls": 32, "mean": 32, "flattened": 4 * 32},
                "label_fractions": levels,
            },
        )
        embed_store.prepare_split(path, "val", rows, 4, world)
        for rank in range(world):
            cfg = LoaderConfig(backend="torch", batch_size=3, num_workers=0)
            loader = build_loader(
                cfg, tiny_shards, "val", process_index=rank, num_processes=world, train=False
            )
            writer = StagingWriter(path, "val", rank, world, {"steps": len(loader)})
            embed_batches(model, loader, writer, rows, (2, 2))
        for rank in range(world):
            embed_store.assemble_split(path, "val", rank, world)
        embed_store.finish_split(path, "val")
        stores[world] = embed_store.read_split(path, "val")
    assert stores[1].keys == stores[2].keys
    for name in ("cls", "mean", "flattened"):
        np.testing.assert_array_equal(stores[1].features[name], stores[2].features[name])
        assert np.abs(stores[1].features[name]).sum(axis=1).min() > 0  # every row was written
