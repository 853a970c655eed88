"""Supervised baselines: CPU smoke runs (tiny ViT, tiny ResNet), resume, stop on a signal, local-weights
initialisation."""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

import radstream.train.supervised as supervised
from radstream.core.config import ConfigError, load_config
from radstream.train.classifier import build_classifier
from radstream.train.run_layout import latest_checkpoint, list_checkpoints
from radstream.train.supervised import ClassifierConfig, SupervisedConfig, run
from radstream.train.weights import adapt_state
from tests.accelerate_state import reset_accelerate
from tests.train.stopping import sigterm_after_first_step

RECIPES = Path(__file__).resolve().parents[2] / "configs" / "supervised"


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it after each run."""
    yield
    reset_accelerate()


def config(recipe: str, shards: Path, run_dir: Path, *overrides: str) -> SupervisedConfig:
    return load_config(
        SupervisedConfig, RECIPES / recipe, [f"shards={shards}", f"run_dir={run_dir}", *overrides]
    )


def lines(run_dir: Path, split: str) -> list[dict]:
    rows = map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
    return [r for r in rows if r["split"] == split]


def test_vit_smoke_run_writes_results_and_resumes(tmp_path: Path, tiny_shards: Path) -> None:
    run_dir = tmp_path / "vit"
    assert run(config("debug_vit.yaml", tiny_shards, run_dir, "run.epochs=1", "optim.lr=3e-3")) == 0
    first = json.loads((run_dir / "results.json").read_text())
    assert first["epochs"] == 1 and first["stopped"] == "done"
    (run_dir / "results.json").unlink()  # pretend the job was extended: the run resumes after epoch 0
    assert run(config("debug_vit.yaml", tiny_shards, run_dir, "run.epochs=2", "optim.lr=3e-3")) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["epoch"] for r in lines(run_dir, "val")] == [0, 1]  # epoch 0 was not trained again
    assert results["kind"] == "supervised" and results["model"] == "vit"
    assert results["arch"] == "vit_tiny_patch16_224" and results["lr"] == 3e-3
    assert results["fraction"] == 1.0 and results["seed"] == 0 and results["epochs"] == 2
    bins = sorted(b["name"] for b in json.loads((tiny_shards / "manifest.json").read_text())["bins"])
    assert results["init"] == "scratch" and results["architecture"]["bins"] == bins
    assert [results["architecture"][k] for k in ("width", "depth", "patch")] == [32, 1, 16]
    assert 0.0 <= results["val_acc"] <= 1.0 and 0.0 <= results["test_acc"] <= 1.0
    assert results["val_acc"] == max(r["acc"] for r in lines(run_dir, "val"))
    n_test = sum(sum(row) for row in results["confusion"])
    assert n_test == 9  # every test sample scored once: the loader's padding repeats are skipped
    assert (run_dir / "best" / "model.safetensors").is_file()
    mtime = (run_dir / "results.json").stat().st_mtime
    assert run(config("debug_vit.yaml", tiny_shards, run_dir, "run.epochs=2")) == 0  # finished: nothing to do
    assert (run_dir / "results.json").stat().st_mtime == mtime


def test_resnet_smoke_run_on_one_percent_from_local_weights(tmp_path: Path, tiny_shards: Path) -> None:
    rgb = timm.create_model("resnet10t", pretrained=False)  # 3 channels, 1000 classes: an "ImageNet" file
    save_file(rgb.state_dict(), tmp_path / "resnet10t.safetensors")
    cfg = config(
        "debug_resnet.yaml",
        tiny_shards,
        tmp_path / "run",
        "loader.label_fraction=0.01",
        f"model.init={tmp_path / 'resnet10t.safetensors'}",
        "run.max_steps=2",
    )
    assert run(cfg) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["model"] == "cnn" and results["arch"] == "resnet10t"
    assert results["fraction"] == 0.01 and results["stopped"] in ("max_steps", "done")
    from radstream.shards.loader_data import (
        load_split,  # the prior it could learn: the 1% subset's labels, per class
    )

    labels = np.concatenate([b.label for b in load_split(tiny_shards, "train", 0.01).bins.values()])
    assert (
        results["train_class_counts"] == np.bincount(labels, minlength=len(results["class_names"])).tolist()
    )


def test_accumulation_keep_last_and_tensorboard(tmp_path: Path, tiny_shards: Path) -> None:
    """What the supervised task gained from the shared trainer: optim.grad_accum_steps batches a step,
    checkpoint.keep_last checkpoints kept, a TensorBoard tracker with run.tensorboard."""
    plain, accumulated = tmp_path / "plain", tmp_path / "accumulated"
    assert run(config("debug_vit.yaml", tiny_shards, plain, "run.epochs=1")) == 0
    reset_accelerate()
    overrides = ("run.epochs=1", "optim.grad_accum_steps=2", "checkpoint.every_steps=1", "checkpoint.keep_last=2",
                 "run.tensorboard=true")  # fmt: skip
    assert run(config("debug_vit.yaml", tiny_shards, accumulated, *overrides)) == 0
    steps = json.loads((plain / "results.json").read_text())["steps"]
    assert steps >= 4
    assert json.loads((accumulated / "results.json").read_text())["steps"] == steps // 2
    assert len(list_checkpoints(accumulated)) == 2
    assert list((accumulated / "tensorboard").rglob("events.out.tfevents.*"))


def test_init_adapts_channels_and_drops_the_head(tmp_path: Path) -> None:
    rgb = timm.create_model("resnet10t", pretrained=False)
    path = tmp_path / "w.pth"
    torch.save({"state_dict": rgb.state_dict()}, path)
    model = build_classifier(ClassifierConfig(kind="cnn", arch="resnet10t", init=str(path)), num_classes=5)
    stem = rgb.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], stem.sum(dim=1, keepdim=True))
    torch.testing.assert_close(
        model.state_dict()["layer1.0.conv1.weight"], rgb.state_dict()["layer1.0.conv1.weight"]
    )
    assert model.fc.weight.shape == (5, rgb.fc.weight.shape[1])
    with pytest.raises(FileNotFoundError, match="local files only"):
        build_classifier(ClassifierConfig(kind="cnn", arch="resnet10t", init=str(tmp_path / "no.pth")), 5)
    vit = ClassifierConfig(
        kind="vit", arch="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2, init=str(path)
    )
    with pytest.raises(ValueError, match="fits only"):
        build_classifier(vit, 5)


def test_init_from_a_timm_tag_in_the_local_hf_cache_only(tmp_path: Path, monkeypatch) -> None:
    """``model.init=timm:<tag>`` reads the weights from the local Hugging Face cache, offline; a tag that is
    not cached is one clear error (never a download)."""
    rgb = timm.create_model("resnet10t", pretrained=False)
    snapshot = tmp_path / "hub" / "models--timm--resnet10t.c3_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in rgb.state_dict().items()}, str(snapshot / "model.safetensors"))
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = ClassifierConfig(kind="cnn", arch="resnet10t", init="timm:resnet10t.c3_in1k")
    model = build_classifier(cfg, num_classes=5)
    stem = rgb.state_dict()["conv1.0.weight"]
    torch.testing.assert_close(model.state_dict()["conv1.0.weight"], stem.sum(dim=1, keepdim=True))
    missing = ClassifierConfig(kind="cnn", arch="resnet50", init="timm:resnet50.a1_in1k")
    with pytest.raises(
        FileNotFoundError, match="timm/resnet50.a1_in1k is not in the local Hugging Face cache"
    ):
        build_classifier(missing, 5)


def test_vit_init_resamples_positions_and_reads_mae_encoders() -> None:
    small = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=112, embed_dim=32, depth=1, num_heads=2
    )
    model = build_classifier(
        ClassifierConfig(kind="vit", arch="vit_tiny_patch16_224", embed_dim=32, depth=1, num_heads=2),
        num_classes=3,
    )
    adapted = adapt_state(model, small.state_dict())
    assert adapted["pos_embed"].shape == model.pos_embed.shape  # 7x7 grid resampled to 14x14
    assert adapted["patch_embed.proj.weight"].shape[1] == 1
    mae_style = {f"encoder.{k}": v for k, v in model.state_dict().items()} | {
        "decoder_pred.weight": torch.zeros(1)
    }
    adapted = adapt_state(model, mae_style)
    assert "head.weight" not in adapted and "blocks.0.attn.qkv.weight" in adapted


def test_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="kind"):
        config("debug_vit.yaml", tmp_path, tmp_path, "model.kind=densenet")
    with pytest.raises(ConfigError, match="ViT only"):
        config("debug_resnet.yaml", tmp_path, tmp_path, "model.depth=2")
    # the kind of earlier recipes
    with pytest.raises(ConfigError, match="model.kind 'resnet50' is now 'cnn'"):
        config("debug_resnet.yaml", tmp_path, tmp_path, "model.kind=resnet50")


# ------------------------------------------------------------------------------- stop, requeue, resume


def comparable(results: dict) -> dict:
    """results.json without the config (it names the run folder)."""
    return {k: v for k, v in results.items() if k != "config"}


def test_resume_after_signal_gives_the_results_of_an_uninterrupted_run(
    tmp_path: Path, tiny_shards: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SIGTERM during a step of epoch 1 (in-process): the step finishes, a checkpoint and stopped.json are
    written, exit 124; the same command resumes and ends with the uninterrupted run's results."""
    reference = tmp_path / "reference"
    assert run(config("debug_vit.yaml", tiny_shards, reference, "optim.lr=3e-3")) == 0
    reset_accelerate()
    steps_per_epoch = len(lines(reference, "train")) // 2
    stop_at = steps_per_epoch + 1  # mid-epoch, after an epoch end (validation, best weights, early stopping)
    loss_fn, calls = supervised.masked_loss, []

    def signalling_loss(*args, **kwargs):
        calls.append(None)
        if len(calls) == stop_at + 1:  # the loss of step `stop_at` (0-based): that step must still finish
            os.kill(os.getpid(), signal.SIGTERM)
        return loss_fn(*args, **kwargs)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(supervised, "masked_loss", signalling_loss)
    assert run(config("debug_vit.yaml", tiny_shards, run_dir, "optim.lr=3e-3")) == 124
    assert latest_checkpoint(run_dir).name == f"step-{stop_at + 1}"
    assert json.loads((run_dir / "stopped.json").read_text())["step"] == stop_at + 1
    assert not (run_dir / "results.json").exists()
    monkeypatch.setattr(supervised, "masked_loss", loss_fn)
    reset_accelerate()

    assert run(config("debug_vit.yaml", tiny_shards, run_dir, "optim.lr=3e-3")) == 0  # no flag change
    assert not (run_dir / "stopped.json").exists()  # only a stop of the current launch leaves it
    ref_losses = {r["step"]: r["loss"] for r in lines(reference, "train")}
    got_losses = {r["step"]: r["loss"] for r in lines(run_dir, "train")}
    assert got_losses == pytest.approx(ref_losses, abs=1e-6)
    got, ref = (comparable(json.loads((d / "results.json").read_text())) for d in (run_dir, reference))
    assert got["epochs"] == 2 and got["steps"] == 2 * steps_per_epoch
    assert got.keys() == ref.keys()
    for key, value in ref.items():  # floats within tolerance; counts, names and confusion matrix exactly
        assert got[key] == (pytest.approx(value, abs=1e-6) if isinstance(value, float) else value), key


def test_sigterm_exits_124_with_checkpoint_and_stop_marker(tmp_path: Path, tiny_shards: Path) -> None:
    """A real process: SIGTERM once training is under way -> exit 124, a checkpoint of the step under way,
    and run_dir/stopped.json for the job script (torchrun would hide the 124)."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "radstream.train.supervised", "--config", str(RECIPES / "debug_vit.yaml"),
           f"shards={tiny_shards}", f"run_dir={run_dir}", "run.epochs=200"]  # fmt: skip
    code, stderr = sigterm_after_first_step(cmd, run_dir)
    assert code == 124, stderr
    saved = json.loads((latest_checkpoint(run_dir) / "loop_state.json").read_text())
    assert saved["step"] == saved["loop"]["step"] >= 1
    assert max(r["step"] for r in lines(run_dir, "train")) == saved["step"]  # the step under way was saved
    marker = json.loads((run_dir / "stopped.json").read_text())
    assert marker["step"] == saved["step"] and marker["exit_code"] == 124
    assert not (run_dir / "results.json").exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_two_bf16_steps_of_the_resnet(tmp_path: Path, tiny_shards: Path) -> None:
    run_dir = tmp_path / "resnet"
    cfg = config("debug_resnet.yaml", tiny_shards, run_dir, "run.cpu=false", "run.mixed_precision=bf16",
                 "loader.backend=auto", "loader.num_workers=2", "run.max_steps=2", "run.log_every=1")  # fmt: skip
    assert run(cfg) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["stopped"] == "max_steps" and results["steps"] == 2
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in lines(run_dir, "train"))


def test_lr_grid_in_one_command_then_the_report_picks_on_validation(
    tmp_path: Path, tiny_shards: Path
) -> None:
    from radstream.report.report import select_best
    from radstream.report.report_files import collect

    run_dir = tmp_path / "grid"
    cfg = config("debug_vit.yaml", tiny_shards, run_dir, "run.epochs=1", "optim.lr_grid=[1e-4,3e-3]")
    assert run(cfg) == 0
    found = {json.loads(p.read_text())["lr"] for p in run_dir.glob("lr-*/results.json")}
    assert found == {1e-4, 3e-3} and {p.name for p in run_dir.iterdir()} == {"lr-0.0001", "lr-0.003"}
    (sel,) = select_best(collect([run_dir]))
    assert sel.lrs_searched == 2 and sel.lr in found
    with pytest.raises(ConfigError, match="lr_grid"):
        config("debug_vit.yaml", tiny_shards, run_dir, "optim.lr_grid=[0.0]")


def test_padding_repeats_are_not_computed_and_the_step_is_the_same() -> None:
    """``without_padding`` keeps the real rows (at least two), tensors and key lists alike; a step on the cut
    batch gives the same weights as on the whole one for a network without batch statistics (the repeats
    carry no loss either way)."""
    from accelerate import Accelerator

    from radstream.train.supervised import SupervisedOptimConfig, train_step, without_padding

    gen = torch.Generator().manual_seed(0)
    batch = {"image": torch.randint(0, 255, (6, 1, 4, 4), dtype=torch.uint8, generator=gen),
             "label": torch.tensor([0, 1, 2, 0, 1, -1]), "valid": torch.tensor([1, 0, 1, 0, 0, 1]).bool(),
             "key": list("abcdef"), "bin": "4x4"}  # fmt: skip
    cut = without_padding(batch)
    assert cut["key"] == ["a", "c", "f"] and cut["label"].tolist() == [0, 2, -1] and cut["bin"] == "4x4"
    assert cut["image"].shape[0] == 3 and torch.equal(cut["image"][1], batch["image"][2])
    one = without_padding({**batch, "valid": torch.tensor([0, 0, 0, 1, 0, 0]).bool()})
    assert one["key"] == ["a", "d"] and one["valid"].tolist() == [False, True]  # BatchNorm's two rows
    assert without_padding({**batch, "valid": torch.ones(6).bool()})["key"] == list("abcdef")

    weights = []
    for drop in (False, True):
        reset_accelerate()
        accelerator = Accelerator(cpu=True)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3))
        model, optimizer = accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        train_step(accelerator, model, optimizer, [batch], step=0, optim=SupervisedOptimConfig(lr=0.1),
                   drop_padding=drop)  # fmt: skip
        weights.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(weights[1], weights[0], rtol=1e-6, atol=1e-7)
