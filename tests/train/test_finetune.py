"""MAE fine-tuning: the layer-wise LR of every block, the sources it starts from, a CPU smoke run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from radstream.core.config import ConfigError, load_config
from radstream.train.config import PretrainConfig
from radstream.train.finetune import (
    EncoderClassifier,
    FinetuneConfig,
    build_finetune_model,
    layer_decay_groups,
    layer_id,
    load_pretrained,
    run,
)
from radstream.train.mae import MAE, MAEConfig
from radstream.train.optim import build_optimizer, set_lr
from tests.accelerate_state import reset_accelerate

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps process-wide state; reset it after each run."""
    yield
    reset_accelerate()


def tiny_mae(depth: int = 4) -> MAE:
    return MAE(MAEConfig(encoder="vit_tiny_patch16_224", embed_dim=32, depth=depth, num_heads=2, decoder_dim=32,
                         decoder_depth=1, decoder_heads=2))  # fmt: skip


def lr_of(optimizer: torch.optim.Optimizer, model: torch.nn.Module, name: str) -> tuple[float, float]:
    """(lr, weight decay) of the group that holds parameter ``name``."""
    param = dict(model.named_parameters())[name]
    group = next(g for g in optimizer.param_groups if any(p is param for p in g["params"]))
    return group["lr"], group["weight_decay"]


def test_layer_wise_decay_gives_the_documented_lr_per_block() -> None:
    model = EncoderClassifier(tiny_mae(depth=4), num_classes=3, pool="mean")
    optimizer = build_optimizer(layer_decay_groups(model, 0.05, 0.75), (0.9, 0.999), 1e-3)
    set_lr(optimizer, 1e-3)
    expected = {  # lr x 0.75 ** (depth + 1 - layer), depth 4
        "head.weight": (1e-3, 0.05),
        "head.bias": (1e-3, 0.0),
        "fc_norm.weight": (1e-3, 0.0),
        "backbone.encoder.norm.weight": (1e-3, 0.0),
        "backbone.encoder.blocks.3.mlp.fc1.weight": (7.5e-4, 0.05),
        "backbone.encoder.blocks.2.attn.qkv.weight": (5.625e-4, 0.05),
        "backbone.encoder.blocks.1.norm1.bias": (4.21875e-4, 0.0),
        "backbone.encoder.blocks.0.attn.proj.weight": (3.1640625e-4, 0.05),
        "backbone.encoder.patch_embed.proj.weight": (2.373046875e-4, 0.05),
        "backbone.encoder.cls_token": (2.373046875e-4, 0.0),
    }
    for name, (lr, wd) in expected.items():
        got_lr, got_wd = lr_of(optimizer, model, name)
        assert math.isclose(got_lr, lr, rel_tol=1e-12) and got_wd == wd, name
    # every trainable parameter is in exactly one group; the decoder is gone
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len({id(p) for p in grouped}) == len(list(model.parameters()))
    assert not any("decoder" in n or "mask_token" in n for n, _ in model.named_parameters())
    assert [layer_id(f"backbone.encoder.blocks.{i}.x", 12) for i in (0, 11)] == [1, 12]
    assert layer_id("backbone.encoder.pos_embed", 12) == 0 and layer_id("head.weight", 12) == 13


def test_forward_any_bin_shape_and_drop_path(tmp_path: Path) -> None:
    mae = tiny_mae(depth=3)
    (tmp_path / "best").mkdir()
    save_file(
        {k: v.contiguous() for k, v in mae.state_dict().items()}, tmp_path / "best" / "model.safetensors"
    )
    (tmp_path / "config.yaml").write_text("model:\n" + "".join(
        f"  {k}: {v}\n" for k, v in dict(encoder="vit_tiny_patch16_224", embed_dim=32, depth=3, num_heads=2,
                                         decoder_dim=32, decoder_depth=1, decoder_heads=2).items()))  # fmt: skip
    cfg = load_config(FinetuneConfig, None, ["shards=x", "run_dir=y", f"model.init={tmp_path}"]).model
    model, folder = build_finetune_model(cfg, num_classes=5)
    assert folder == tmp_path / "best"  # a run folder starts from its best weights
    assert torch.equal(
        model.backbone.encoder.blocks[1].attn.qkv.weight, mae.encoder.blocks[1].attn.qkv.weight
    )
    rates = [getattr(b.drop_path1, "drop_prob", 0.0) for b in model.backbone.encoder.blocks]
    assert rates == pytest.approx([0.0, 0.05, 0.1])
    for shape in ((2, 1, 32, 64), (3, 1, 48, 16)):
        assert model(torch.rand(shape)).shape == (shape[0], 5)


def test_exported_encoder_folder_loads_the_same_weights(tmp_path: Path) -> None:
    """The layout of `radstream export`: timm keys, the architecture in config.json's radstream section."""
    mae = tiny_mae(depth=2)
    save_file(
        {k: v.contiguous() for k, v in mae.encoder.state_dict().items()}, tmp_path / "model.safetensors"
    )
    config = {"architecture": "vit_tiny_patch16_224", "model_args": {"in_chans": 1},
              "radstream": {"pos_embed": "sincos", "embed_dim": 32, "depth": 2, "num_heads": 2}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, folder = load_pretrained(tmp_path)
    assert folder == tmp_path
    imgs = torch.rand(2, 1, 32, 48)
    assert torch.allclose(loaded.eval().forward_features(imgs), mae.eval().forward_features(imgs), atol=1e-6)
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "x"}))
    with pytest.raises(ValueError, match="radstream section"):
        load_pretrained(tmp_path)


def test_bad_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="missing mandatory value: init"):
        load_config(FinetuneConfig, CONFIGS / "finetune" / "vit.yaml", ["shards=x", "run_dir=y"])
    with pytest.raises(ConfigError, match="layer_decay"):
        load_config(FinetuneConfig, None, ["shards=x", "run_dir=y", "model.init=z", "optim.layer_decay=0"])


def pretrain(shards: Path, run_dir: Path, *overrides: str) -> Path:
    from radstream.train.pretrain import run as run_pretrain

    cfg = load_config(PretrainConfig, CONFIGS / "pretrain" / "debug.yaml",
                      [f"shards={shards}", f"run_dir={run_dir}", "run.tensorboard=false", *overrides])  # fmt: skip
    assert run_pretrain(cfg) == 0
    return run_dir


def test_smoke_run_from_an_mae_run_writes_results_and_resumes(tmp_path: Path, tiny_shards: Path) -> None:
    mae_run = pretrain(tiny_shards, tmp_path / "mae", "run.epochs=1")
    run_dir = tmp_path / "ft"
    overrides = [f"shards={tiny_shards}", f"run_dir={run_dir}", f"model.init={mae_run}", "run.epochs=1"]
    cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / "debug.yaml", overrides)
    assert run(cfg) == 0
    results = json.loads((run_dir / "results.json").read_text())
    assert results["kind"] == "supervised" and results["model"] == "mae_finetune"
    assert results["arch"] == "vit_tiny_patch16_224" and results["checkpoint"] == str(
        (mae_run / "best").resolve()
    )
    assert results["config"]["model"]["init"] == str(mae_run)  # what the model card reader matches
    assert results["init"] == "MAE run mae (from scratch)"  # named like the probe rows
    assert results["config"]["optim"]["layer_decay"] == 0.65 and results["fraction"] == 1.0
    assert sum(map(sum, results["confusion"])) == 9 and 0.0 <= results["test_acc"] <= 1.0
    from safetensors.torch import load_file

    tuned, pretrained = (
        load_file(run_dir / "best" / "model.safetensors"),
        load_file(mae_run / "best" / "model.safetensors"),
    )
    for block in (
        "blocks.0.attn.qkv.weight",
        "patch_embed.proj.weight",
    ):  # end to end: the encoder trained too
        assert not torch.equal(tuned[f"backbone.encoder.{block}"], pretrained[f"encoder.{block}"]), block
    assert not any(k.startswith("backbone.decoder") for k in tuned)
    mtime = (run_dir / "results.json").stat().st_mtime
    assert run(cfg) == 0  # finished: nothing to do
    assert (run_dir / "results.json").stat().st_mtime == mtime

    from radstream.report.export import export

    export(mae_run, tmp_path / "encoder", results=[tmp_path])  # the model card finds the fine-tuning result
    assert "fine-tuned (mae_finetune" in (tmp_path / "encoder" / "README.md").read_text()
    exported, _ = load_pretrained(
        tmp_path / "encoder"
    )  # and fine-tuning starts from the export as from the run
    imgs = torch.rand(2, 1, 32, 64)
    original, _ = load_pretrained(mae_run)
    assert torch.allclose(
        exported.eval().forward_features(imgs), original.eval().forward_features(imgs), atol=1e-5
    )


def test_lp_ft_trains_the_head_alone_for_its_probe_steps(tmp_path: Path, tiny_shards: Path) -> None:
    """optim.probe_steps covering the run: the encoder's blocks and embeddings keep the MAE's weights bit for
    bit while the head (and the norms after the blocks) train; the smoke run above shows them moving without
    it."""
    from safetensors.torch import load_file

    mae_run = pretrain(tiny_shards, tmp_path / "mae", "run.epochs=1")
    run_dir = tmp_path / "lpft"
    overrides = [f"shards={tiny_shards}", f"run_dir={run_dir}", f"model.init={mae_run}", "run.epochs=1",
                 "optim.probe_steps=1000", "optim.lr=0.01", "optim.lr_rule=absolute"]  # fmt: skip
    assert run(load_config(FinetuneConfig, CONFIGS / "finetune" / "debug.yaml", overrides)) == 0
    from radstream.train.run_layout import latest_checkpoint

    tuned = load_file(latest_checkpoint(run_dir) / "model.safetensors")
    pretrained = load_file(mae_run / "best" / "model.safetensors")
    # the blocks and embeddings; the encoder's final norm is in the layer after the blocks, with the head
    encoder = {
        k: v for k, v in tuned.items() if k.startswith("backbone.encoder.") and ".encoder.norm." not in k
    }
    moved = [k for k, v in encoder.items() if not torch.equal(v, pretrained[k.removeprefix("backbone.")])]
    assert encoder and not moved, moved
    head = load_file(run_dir / "best" / "model.safetensors")["head.weight"]
    assert head.abs().max() > 1e-3  # moved from its init (std 2e-5)


@pytest.mark.slow
@pytest.mark.long
def test_fine_tuned_model_beats_its_own_linear_probe_at_full_labels(
    tmp_path: Path, tiny_shards: Path
) -> None:
    """The MAE paper's finding on the test corpus: the same encoder, end to end, beats a linear head on the
    same frozen features (mean-pooled patch tokens, as the fine-tuning head; each picks its LR on validation)."""
    from radstream.eval import probe
    from radstream.eval.embed import EmbedConfig
    from radstream.eval.embed import run as embed
    from radstream.eval.probe_config import ProbeConfig

    mae_run = pretrain(tiny_shards, tmp_path / "mae", "run.epochs=3")
    emb = tmp_path / "emb.zarr"
    embed(load_config(EmbedConfig, None, [f"checkpoint={mae_run / 'best'}", f"shards={tiny_shards}", f"out={emb}",
                                          "loader.backend=torch", "loader.batch_size=8", "cpu=true"]))  # fmt: skip
    probe_cfg = load_config(ProbeConfig, CONFIGS / "probe" / "debug.yaml",
                            [f"embeddings={emb}", f"out={tmp_path / 'probe'}", "label_fractions=[1.0]",
                             "aggregations=[mean]", "max_epochs=30"])  # fmt: skip
    probed = max(r["test_acc_mean"] for r in probe.run(probe_cfg, progress=False)["summary"])
    tuned = []
    for lr in (1e-3, 3e-3):
        run_dir = tmp_path / f"ft-{lr}"
        cfg = load_config(FinetuneConfig, CONFIGS / "finetune" / "debug.yaml",
                          [f"shards={tiny_shards}", f"run_dir={run_dir}", f"model.init={mae_run}", f"optim.lr={lr}",
                           "run.epochs=20"])  # fmt: skip
        assert run(cfg) == 0
        tuned.append(json.loads((run_dir / "results.json").read_text()))
    best = max(tuned, key=lambda r: r["val_acc"])
    assert best["test_acc"] > probed, (best["test_acc"], probed)
