"""``radstream export``: plain timm loads the encoder in a fresh process and gives radstream's features; the
model card; one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import radstream.train.pretrain as pretrain
from radstream.cli import main as cli_main
from radstream.core.config import load_config, to_yaml
from radstream.eval.embed import aggregate_tokens
from radstream.report.export import BIN_TABLES, CARD, CONFIG_JSON, WEIGHTS, export
from radstream.report.model_card import evaluation_section
from radstream.shards.images import unit_float
from radstream.shards.loader import build_loader
from radstream.shards.loader_config import LoaderConfig
from radstream.train.checkpoint import load_encoder
from radstream.train.config import PretrainConfig
from tests.accelerate_state import reset_accelerate

RECIPE = Path(__file__).resolve().parents[2] / "configs" / "pretrain" / "debug.yaml"

# Runs in a fresh interpreter that imports timm only: exactly what a user of the export does.
TIMM_SCRIPT = r"""
import json, sys
import numpy as np, timm, torch
from safetensors.torch import load_file

out, images_path, result_path = sys.argv[1:4]
cfg = json.load(open(f"{out}/config.json"))
args = {k: v for k, v in cfg["model_args"].items() if k not in ("in_chans", "num_classes")}
plain = timm.create_model(cfg["architecture"], in_chans=1, pretrained=True,
                          pretrained_cfg_overlay=dict(file=f"{out}/model.safetensors"), num_classes=0, **args).eval()
local = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
tables = load_file(f"{out}/pos_embed_bins.safetensors")
images, results = np.load(images_path), {}
with torch.no_grad():
    for name in images.files:
        x = torch.from_numpy(images[name])
        state = load_file(f"{out}/model.safetensors")
        state["pos_embed"] = tables[name]
        at_bin = timm.create_model(cfg["architecture"], **{**cfg["model_args"], "img_size": tuple(x.shape[-2:])})
        at_bin.load_state_dict(state)
        for tag, net in (("plain", plain), ("local", local), ("bin", at_bin.eval())):
            tokens = net.forward_features(x)
            results[f"{name}/{tag}/cls"] = tokens[:, 0].numpy()
            results[f"{name}/{tag}/mean"] = tokens[:, 1:].mean(dim=1).numpy()
np.savez(result_path, **results)
ours = {m.split(".")[0] for m in sys.modules} & {"radstream", "train", "shards", "core", "ingest", "bucketing"}
assert not ours, ours
"""


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it after each test."""
    yield
    reset_accelerate()


def pretrain_config(shards: Path, run_dir: Path, *overrides: str) -> PretrainConfig:
    return load_config(
        PretrainConfig,
        RECIPE,
        [f"shards={shards}", f"run_dir={run_dir}", "run.tensorboard=false", "run.grid_images=0", *overrides],
    )


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, tiny_shards: Path) -> Path:
    """A finished debug run (sin-cos positions): best/, metrics.jsonl, summary.json, in runs/mae."""
    run_dir = tmp_path_factory.mktemp("runs") / "mae"
    assert pretrain.run(pretrain_config(tiny_shards, run_dir)) == 0
    reset_accelerate()
    return run_dir


@pytest.fixture(scope="module")
def learned_run(tmp_path_factory, tiny_shards: Path) -> Path:
    """A run with learned positions stopped before its first validation: a checkpoint, no best/."""
    from accelerate import Accelerator

    from radstream.train.checkpoint import save_checkpoint
    from radstream.train.mae import build_mae

    run_dir = tmp_path_factory.mktemp("learned")
    cfg = pretrain_config(tiny_shards, run_dir, "model.pos_embed=learned")
    torch.manual_seed(1)
    model = build_mae(cfg.model)
    torch.nn.init.normal_(model.encoder.pos_embed, std=0.5)  # positions that matter in the features
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(model)
    save_checkpoint(accelerator, run_dir, 2, {"epoch": 0}, to_yaml(cfg), keep_last=1)
    (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return run_dir


def images_per_bin(shards: Path) -> dict[str, np.ndarray]:
    """Up to 3 stored training images of every bin shape, keyed "HxW"."""
    loader = build_loader(
        LoaderConfig(backend="torch", batch_size=3, num_workers=0), shards, "train", train=False
    )
    out: dict[str, np.ndarray] = {}
    with loader:
        for batch in loader:
            h, w = batch["image"].shape[-2:]
            out.setdefault(f"{h}x{w}", unit_float(batch["image"])[batch["valid"].bool()].numpy())
    return out


def radstream_features(checkpoint: Path, images: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """CLS and mean patch token per image, through radstream.eval.embed's encoder path."""
    model, _, _ = load_encoder(checkpoint)
    out = {}
    with torch.no_grad():
        for name, array in images.items():
            x = torch.from_numpy(array)
            feats = aggregate_tokens(model.forward_features(x), model.grid(x), None)
            out[f"{name}/cls"], out[f"{name}/mean"] = feats["cls"].numpy(), feats["mean"].numpy()
    return out


def timm_features(export_dir: Path, images: dict[str, np.ndarray], tmp: Path) -> dict[str, np.ndarray]:
    """TIMM_SCRIPT's features in a fresh interpreter (no radstream on its path, no network)."""
    np.savez(tmp / "images.npz", **images)
    (tmp / "load_timm.py").write_text(TIMM_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, str(tmp / "load_timm.py"), str(export_dir), str(tmp / "images.npz"), str(tmp / "f.npz")],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(tmp / "f.npz"))


def assert_same(ours: np.ndarray, theirs: np.ndarray) -> None:
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-5)


def test_sincos_export_loads_in_plain_timm_with_radstream_features(trained_run, tiny_shards, tmp_path):
    out = tmp_path / "encoder"
    config = export(trained_run, out)
    assert sorted(p.name for p in out.iterdir()) == sorted([WEIGHTS, CONFIG_JSON, BIN_TABLES, CARD])
    from safetensors.torch import load_file

    state = load_file(str(out / WEIGHTS))
    assert not any(k.startswith(("decoder", "mask_token", "encoder.")) for k in state)
    main = "x".join(map(str, config["model_args"]["img_size"]))
    assert main == "80x64" and config["radstream"]["weights"] == "best"  # the bin with most training images
    assert torch.equal(load_file(str(out / BIN_TABLES))[main], state["pos_embed"])
    assert state["pos_embed"][0, 0].abs().max() == 0  # radstream gives the CLS token no position

    images = images_per_bin(tiny_shards)
    assert len(images) >= 2
    ours = radstream_features(trained_run / "best", images)
    theirs = timm_features(out, images, tmp_path)
    for name in images:
        for agg in ("cls", "mean"):
            assert_same(ours[f"{name}/{agg}"], theirs[f"{name}/bin/{agg}"])  # every trained shape, exactly
    for tag in ("plain", "local"):  # plain timm at the exported img_size
        for agg in ("cls", "mean"):
            assert_same(ours[f"{main}/{agg}"], theirs[f"{main}/{tag}/{agg}"])


def test_learned_positions_match_at_every_shape_and_latest_is_the_fallback(
    learned_run, tiny_shards, tmp_path, caplog
):
    out = tmp_path / "encoder"
    with caplog.at_level("WARNING"):
        config = export(learned_run, out)
    assert "no best/model.safetensors" in caplog.text
    assert config["radstream"]["weights"] == "latest" and config["model_args"]["img_size"] == [224, 224]
    assert "latest checkpoint (step 2)" in (out / CARD).read_text()
    images = images_per_bin(tiny_shards)
    ours = radstream_features(learned_run, images)
    theirs = timm_features(out, images, tmp_path)
    for name in images:  # timm's dynamic_img_size resamples the native table as radstream does
        for tag in ("plain", "local", "bin"):
            for agg in ("cls", "mean"):
                assert_same(ours[f"{name}/{agg}"], theirs[f"{name}/{tag}/{agg}"])


def test_model_card_describes_the_run_and_its_results(trained_run, tiny_shards, tmp_path):
    probes = trained_run.parent / "probe"
    probes.mkdir(exist_ok=True)
    head = {
        "model": "probe_cls",
        "aggregation": "cls",
        "fraction": 1.0,
        "seed": 0,
        "val_acc": 0.5,
        "test_acc": 0.625,
    }
    mine = {"kind": "probe", "checkpoint": str((trained_run / "best").resolve()),
            "heads": [{**head, "lr": 0.1}, {**head, "lr": 1.0, "val_acc": 0.25, "test_acc": 0.75}]}  # fmt: skip
    (probes / "probe_results.json").write_text(json.dumps(mine))
    other = trained_run.parent / "other_probe"
    other.mkdir(exist_ok=True)
    theirs = {**mine, "checkpoint": "/elsewhere/best", "heads": [{**head, "lr": 0.1, "test_acc": 0.111}]}
    (other / "probe_results.json").write_text(json.dumps(theirs))

    export(trained_run, tmp_path / "encoder")
    card = (tmp_path / "encoder" / CARD).read_text()
    front = card.split("---\n")[1]
    assert "library_name: timm" in front and "license: other" in front and "datasets: []" in front
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert f"`{manifest['fingerprint']}`" in card
    # The dataset and its source are named by fingerprints, never by a path.
    assert f"fingerprint `{manifest['privacy']['source_fingerprint']}`, patients pseudonymised" in card
    assert str(tiny_shards) not in card and str(trained_run) not in card
    for b in manifest["bins"]:
        c = b["counts"]
        assert f"| {b['name']} | {c.get('train', 0)} | {c.get('val', 0)} | {c.get('test', 0)} |" in card
    assert all(f"| {name} |" in card for name in manifest["class_names"])
    summary = json.loads((trained_run / "summary.json").read_text())
    assert f"| test MSE (masked patches, [0, 1] pixels) | {summary['test_mse']:.6g} |" in card
    assert f"best validation loss | {summary['best_val_loss']:.6g} (epoch {summary['best_epoch']})" in card
    assert "model:\n  encoder: vit_tiny_patch16_224" in card  # the recipe
    assert "| linear probe (cls) | 100% | 0.6250 ± 0.0000 | 0.1 | 1 |" in card  # best val LR, this checkpoint
    assert "0.111" not in card  # another checkpoint's probe is not this encoder's

    empty = tmp_path / "no_results"
    empty.mkdir()
    export(trained_run, tmp_path / "alone", results=[empty])
    assert "not evaluated" in (tmp_path / "alone" / CARD).read_text()


def test_renamed_test_mse_keys_are_labelled(tmp_path):
    summary = {"test_mse_all": 0.25, "test_mse_foreground": 0.5, "test_images": 9, "tested_weights": "best"}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    text = evaluation_section(tmp_path, tmp_path / "best", [tmp_path])
    assert "| test MSE, all masked patches ([0, 1] pixels) | 0.25 |" in text
    assert "| test MSE, masked foreground patches ([0, 1] pixels) | 0.5 |" in text


def run_cli(*args: str) -> int:
    return cli_main(["export", *map(str, args)])


def test_bad_input_is_one_line_and_nothing_is_lost(trained_run, tmp_path, capsys):
    assert run_cli(tmp_path / "nope", tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a pretraining run folder" in err and "nope" in err

    empty_run = tmp_path / "empty_run"
    empty_run.mkdir()
    (empty_run / "config.yaml").write_text((trained_run / "config.yaml").read_text())
    assert run_cli(empty_run, tmp_path / "out") == 2
    assert "no best/model.safetensors and no complete checkpoint" in capsys.readouterr().err

    supervised_run = tmp_path / "supervised_run"
    supervised_run.mkdir()
    (supervised_run / "config.yaml").write_text("model:\n  kind: vit\n  arch: vit_tiny_patch16_224\n")
    assert run_cli(supervised_run, tmp_path / "out") == 2
    assert "not an MAE pretraining run" in capsys.readouterr().err

    best = trained_run / "best"
    before = (best / "model.safetensors").read_bytes()
    assert run_cli(trained_run, best, "--force") == 2  # never over the run's own weights
    assert "the run's own folder or weights" in capsys.readouterr().err
    assert (best / "model.safetensors").read_bytes() == before and not (best / CARD).exists()

    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert run_cli(trained_run, out) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not empty (use --force" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    assert run_cli(trained_run, out, "--format", "hf") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--format hf is not available" in err
    assert run_cli(trained_run, out, "--force") == 0
    assert (out / "notes.txt").read_text() == "mine" and (out / WEIGHTS).is_file()
    assert "export: vit_tiny_patch16_224 encoder (best weights" in capsys.readouterr().out


def test_the_console_script_imports_no_torch_for_its_parser():
    """`radstream export` is registered without importing torch/timm: every other command stays fast."""
    code = "import sys, radstream.cli as c; c.make_parser(); print('torch' in sys.modules or 'timm' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "False", done.stderr[-2000:]
