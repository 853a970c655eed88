"""MAE pretraining: LR schedule, config, grids, a CPU smoke run, early stopping, non-finite loss.

Runs are in-process on the CPU with the debug recipe on the session's tiny shard dataset (seconds each).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import radstream.train.pretrain as pretrain
import radstream.train.trainer as trainer
from radstream.core.config import ConfigError, load_config
from radstream.shards.images import unit_float
from radstream.train.config import PretrainConfig
from radstream.train.optim import lr_at, make_schedule
from radstream.train.run_layout import latest_checkpoint
from radstream.train.steps import NonFiniteLossError
from radstream.train.visualize import masked_images, reconstruction_grid
from tests.accelerate_state import reset_accelerate

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "pretrain"


def debug_config(shards: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig, RECIPES / "debug.yaml", [f"shards={shards}", f"run_dir={run_dir}", *overrides]
    )


def read_metrics(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["split"] == split]


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it between runs as accelerate's own test case does."""
    yield
    reset_accelerate()


def test_lr_at_warmup_then_cosine():
    kw = {"peak_lr": 1.0, "min_lr": 0.1, "warmup_steps": 4, "total_steps": 14}
    lrs = [lr_at(s, **kw) for s in range(14)]
    assert lrs[:4] == [0.25, 0.5, 0.75, 1.0]
    assert lrs[4] == pytest.approx(1.0)
    assert lrs[-1] == pytest.approx(0.1)
    assert (np.diff(lrs[4:]) <= 0).all()  # cosine only decreases
    assert lr_at(100, **kw) == pytest.approx(0.1)  # past the end it stays at min_lr
    assert lr_at(0, peak_lr=2.0, min_lr=0.0, warmup_steps=0, total_steps=10) == pytest.approx(2.0)


def test_schedule_scales_lr_by_global_batch(tmp_path):
    cfg = debug_config(tmp_path, tmp_path, "loader.batch_size=16", "optim.lr=1e-3", "optim.grad_accum_steps=2",
                       "optim.warmup_steps=null", "optim.warmup_epochs=1.5", "run.epochs=3")  # fmt: skip
    sched = make_schedule(cfg.optim, cfg.run.epochs, cfg.loader.batch_size, loader_batches=9, num_processes=4)
    assert sched.global_batch == 16 * 4 * 2
    assert sched.peak_lr == pytest.approx(1e-3 * 128 / 256)
    assert (sched.steps_per_epoch, sched.total_steps, sched.warmup_steps) == (4, 12, 6)
    assert cfg.optim.lr == 1e-3  # derived values are never written back


def test_peak_lr_counts_the_real_patches_a_step_holds(tmp_path):
    """MAE's rule in reference images (patches / 196): at 224x224 it is the image count, padding repeats
    excluded; with a token budget a bin of 512x512 (49 a batch) and one of 224x224 (256 a batch) hold the
    same patches, so both get one LR, the budget's / 196 images."""
    from radstream.bucketing.schedule import mean_step_tokens, token_budget_batch_sizes

    cfg = debug_config(tmp_path, tmp_path, "optim.lr=1e-3")
    fixed = mean_step_tokens({"224x224": 100}, 32, world_size=2, patch_size=16)  # 2 global batches of 64
    assert fixed == pytest.approx(100 / 4 * 196)  # 100 real images over 2 steps x 2 ranks; 28 padding slots
    sched = make_schedule(cfg.optim, 1, 32, loader_batches=2, num_processes=2, step_tokens=fixed)
    assert sched.peak_lr == pytest.approx(1e-3 * 50 / 256)  # 50 real images a step, not 64
    sizes = token_budget_batch_sizes(["224x224", "512x512"], 256 * 196, 16)
    assert sizes == {"224x224": 256, "512x512": 49}
    at224, at512 = (mean_step_tokens({b: 49 * 256 * 4}, sizes, world_size=1, patch_size=16) for b in sizes)
    assert at224 / 196 == pytest.approx(256) and at512 / 196 == pytest.approx(49 * 1024 / 196)  # = 256
    assert at512 == pytest.approx(at224)  # an image count would give them 256 : 49


def test_lr_schedule_follows_the_images_trained_across_world_sizes(tmp_path):
    """8 -> 4 processes: the global batch halves, the schedule's steps double, the position is in images."""
    cfg = debug_config(tmp_path, tmp_path, "loader.batch_size=4", "optim.warmup_steps=null",
                       "optim.warmup_epochs=1", "run.epochs=4")  # fmt: skip
    old = make_schedule(cfg.optim, cfg.run.epochs, cfg.loader.batch_size, loader_batches=10, num_processes=8)
    new = make_schedule(cfg.optim, cfg.run.epochs, cfg.loader.batch_size, loader_batches=20, num_processes=4)
    images = 7 * old.global_batch  # 7 steps at 8 processes
    assert old.lr_step(images) == 7 and new.lr_step(images) == 14
    # the same share of the warmup after the same images (7/10 = 14/20), and of the cosine later on
    assert new.lr(new.lr_step(images) - 1) / new.peak_lr == pytest.approx(old.lr(6) / old.peak_lr)
    later = 25 * old.global_batch
    assert new.lr(new.lr_step(later)) / new.peak_lr == pytest.approx(old.lr(25) / old.peak_lr, abs=0.03)
    assert new.peak_lr == pytest.approx(old.peak_lr / 2)  # lr x global batch / 256 (lr_rule per_256)


def test_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="shards"):
        load_config(PretrainConfig, RECIPES / "debug.yaml", [f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="mixed_precision"):
        debug_config(tmp_path, tmp_path, "run.mixed_precision=fp8")
    with pytest.raises(ConfigError, match="patch size"):
        debug_config(tmp_path, tmp_path, "loader.patch_size=14")
    with pytest.raises(ConfigError, match="nope"):
        debug_config(tmp_path, tmp_path, "optim.nope=1")


@pytest.mark.parametrize("recipe", ["debug.yaml", "vit_b16_224.yaml", "vit_s16_smart.yaml"])
def test_recipes_load(recipe, tmp_path):
    cfg = load_config(PretrainConfig, RECIPES / recipe, [f"shards={tmp_path}", f"run_dir={tmp_path}"])
    assert cfg.loader.patch_size == 16


def test_reconstruction_grid_rows_of_different_shapes():
    wide, tall = torch.zeros(1, 16, 32), torch.ones(1, 32, 16)
    grid = reconstruction_grid([[wide, wide, wide], [tall, tall, tall]], gap=2)
    assert grid.dtype == np.uint8
    assert grid.shape == (2 + 16 + 2 + 32 + 2, 2 + 3 * 32 + 2 * 2 + 2)
    assert grid[2, 2] == 0 and grid[20, 2] == 255  # first row black panel, second row white panel
    with pytest.raises(ValueError, match="height"):
        reconstruction_grid([[wide, tall]])


def test_masked_images_fill_only_hidden_patches():
    imgs = torch.zeros(1, 1, 32, 32)
    out = masked_images(imgs, torch.tensor([[1.0, 0.0, 0.0, 1.0]]), 16, fill=0.5)
    assert out[0, 0, :16, :16].eq(0.5).all() and out[0, 0, 16:, 16:].eq(0.5).all()
    assert out[0, 0, :16, 16:].eq(0).all() and out[0, 0, 16:, :16].eq(0).all()


def test_smoke_run_writes_everything(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    assert pretrain.run(debug_config(tiny_shards, run_dir)) == 0

    train = read_metrics(run_dir, "train")
    steps_per_epoch = train[-1]["step"] // 2
    assert [row["step"] for row in train] == list(range(1, 2 * steps_per_epoch + 1))  # log_every 1, 2 epochs
    for key in (
        "loss",
        "lr",
        "images_per_s",
        "tokens_per_s",
        "data_wait_frac",
        "peak_memory_mb",
        "tokens_skipped",
    ):
        assert all(math.isfinite(row[key]) for row in train), key
    assert all(0 <= row["data_wait_frac"] <= 1 for row in train)
    assert [row["epoch"] for row in read_metrics(run_dir, "val")] == [0, 1]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "done" and summary["steps"] == 2 * steps_per_epoch
    assert 0 < summary["test_mse"] < 1 and summary["test_images"] > 0
    assert read_metrics(run_dir, "test")[0]["mse_masked"] == summary["test_mse"]

    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.name == f"step-{2 * steps_per_epoch}"
    assert {
        "model.safetensors",
        "optimizer.bin",
        "random_states_0.pkl",
        "loop_state.json",
        "config.yaml",
    } <= {p.name for p in latest.iterdir()}
    assert len(list((run_dir / "checkpoints").glob("step-*"))) == 2  # keep_last 2
    assert "embed_dim: 32" in (run_dir / "config.yaml").read_text()
    assert (run_dir / "best" / "model.safetensors").is_file()
    assert list((run_dir / "tensorboard").rglob("events.out.tfevents.*"))
    grids = sorted((run_dir / "samples").glob("*.png"))
    assert [g.name for g in grids] == ["epoch-000.png", "epoch-001.png"]
    assert Image.open(grids[0]).mode == "L"


def test_restart_after_finish_does_nothing(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = debug_config(tiny_shards, run_dir, "run.epochs=1", "run.grid_images=0")
    assert pretrain.run(cfg) == 0
    lines = (run_dir / "metrics.jsonl").read_text().count('"train"')
    assert pretrain.run(cfg) == 0
    assert (run_dir / "metrics.jsonl").read_text().count('"train"') == lines  # no step trained again


def test_early_stopping_with_zero_lr(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = debug_config(tiny_shards, run_dir, "optim.lr=0", "run.patience=1", "run.epochs=6",
                       "run.grid_images=0", "run.log_every=100")  # fmt: skip
    assert pretrain.run(cfg) == 0
    val = read_metrics(run_dir, "val")
    assert len(val) == 2  # epoch 0 sets the best, epoch 1 does not beat it: patience 1 is used up
    assert val[0]["loss"] == val[1]["loss"]  # fixed per-image masks: an unchanged model scores the same
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "early_stop" and summary["epochs_completed"] == 2
    assert summary["best_epoch"] == 0


def test_non_finite_loss_names_step_and_keys(tiny_shards, tmp_path, monkeypatch):
    seen: list[list[str]] = []

    class Poisoned:
        """The train loader, with NaN pixels in its third batch."""

        def __init__(self, loader) -> None:
            self.loader = loader

        def __getattr__(self, name: str):
            return getattr(self.loader, name)

        def __len__(self) -> int:
            return len(self.loader)

        def __iter__(self):
            for i, batch in enumerate(self.loader):
                if i == 2:
                    batch["image"] = unit_float(batch["image"]) * float("nan")
                    seen.append(batch["key"])
                yield batch

    def poisoned_loader(*args, **kwargs):
        loader = build_loader(*args, **kwargs)
        return Poisoned(loader) if kwargs["train"] else loader

    build_loader = trainer.build_loader
    monkeypatch.setattr(trainer, "build_loader", poisoned_loader)
    run_dir = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 2 ") as err:
        pretrain.run(debug_config(tiny_shards, run_dir, "checkpoint.every_steps=0"))
    assert seen and all(key in str(err.value) for key in seen[0])
    assert latest_checkpoint(run_dir) is None  # nothing saved from the broken step


def test_main_exit_codes(tmp_path):
    assert pretrain.main(["--config", str(RECIPES / "debug.yaml"), f"run_dir={tmp_path}"]) == 2  # no shards


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_compiled_run(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = debug_config(tiny_shards, run_dir, "run.cpu=false", "run.mixed_precision=bf16", "run.compile=true",
                       "loader.backend=auto", "run.epochs=1")  # fmt: skip
    assert pretrain.run(cfg) == 0
    train = read_metrics(run_dir, "train")
    assert all(math.isfinite(row["loss"]) for row in train) and train[-1]["peak_memory_mb"] > 0
    assert 0 < json.loads((run_dir / "summary.json").read_text())["test_mse"] < 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_two_bf16_steps_fed_by_the_gpu_loader(tiny_shards, tmp_path):
    run_dir = tmp_path / "run"
    cfg = debug_config(tiny_shards, run_dir, "run.cpu=false", "run.mixed_precision=bf16", "loader.backend=auto",
                       "loader.num_workers=2", "run.max_steps=2", "run.log_every=1")  # fmt: skip
    assert pretrain.run(cfg) == 0
    train = read_metrics(run_dir, "train")
    assert len(train) == 2 and all(math.isfinite(row["loss"]) for row in train)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped"] == "max_steps" and summary["steps"] == 2


@pytest.mark.parametrize("recipe", ["pretrain/debug.yaml", "supervised/debug_vit.yaml"])
def test_loader_seed_follows_run_seed_unless_set(tmp_path, monkeypatch, recipe):
    """Seeds vary the data order and augmentation, not only the initialisation."""
    import types

    import radstream.train.trainer as trainer
    from radstream.train.supervised import SupervisedConfig

    seen = []
    monkeypatch.setattr(
        trainer, "build_loader", lambda cfg, *a, run_seed, **k: seen.append(cfg.for_run(run_seed).seed)
    )
    acc = types.SimpleNamespace(process_index=0, num_processes=1, device="cpu")
    config_cls = PretrainConfig if recipe.startswith("pretrain") else SupervisedConfig
    for overrides in (["run.seed=3"], ["run.seed=3", "loader.seed=5"]):
        cfg = load_config(
            config_cls, RECIPES.parent / recipe, [f"shards={tmp_path}", f"run_dir={tmp_path}", *overrides]
        )
        trainer._loader(cfg, acc, "train")
    assert seen == [3, 5]


def test_token_budget_lr_follows_the_real_patches_a_step_holds(tiny_shards, tmp_path):
    """With a token budget, the peak LR scales with the epoch's mean real patches per step / 196 (MAE's rule in
    reference images), not the batch_size cap; the schedule's global batch is the mean images per step."""
    from radstream.bucketing.geometry import Bin
    from radstream.shards.loader import build_loader

    run_dir = tmp_path / "run"
    overrides = ("loader.batch_size=8", "loader.token_budget=48", "optim.lr=1e-3", "run.epochs=1",
                 "run.grid_images=0")  # fmt: skip
    cfg = debug_config(tiny_shards, run_dir, *overrides)
    loader = build_loader(cfg.loader, tiny_shards, "train")
    sizes, counts = loader.batch_sizes, loader.data.counts
    steps = {name: -(-counts[name] // sizes[name]) for name in counts if counts[name]}
    mean = sum(steps[n] * sizes[n] for n in steps) / sum(steps.values())
    assert mean < 8  # the budget gives some bins fewer images than the cap
    assert pretrain.run(cfg) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["global_batch"] == pytest.approx(mean)
    patches = sum(counts[n] * Bin.parse(n).tokens(16) for n in steps) / sum(steps.values())
    assert summary["peak_lr"] == pytest.approx(1e-3 * patches / 196 / 256)
