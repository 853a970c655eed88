"""End-to-end fine-tuning of a pretrained MAE encoder on the labelled shard dataset, under Accelerate.

    accelerate launch -m radstream.train.finetune --config configs/finetune/vit.yaml shards=OUT run_dir=RUN \\
        model.init=runs/mae optim.lr_grid=study loader.label_fraction=0.01 run.seed=1

The MAE paper's headline evaluation. ``model.init`` is where the encoder comes from: an MAE run folder (the
weights of the run, ``radstream.train.run_layout.resolve_weights``: ``best/``, else its latest checkpoint), its ``best/``
folder, a checkpoint folder, or a folder written by ``radstream export`` (``model.safetensors`` +
``config.json``). The network is that encoder, with its own positions for every bin shape (sin-cos or its
learned table resampled, as in pretraining), mean-pooled patch tokens (or the CLS token), a LayerNorm and a
linear head; the decoder is dropped.

The recipe is the reference MAE fine-tuning's for ViT-B (facebookresearch/mae ``main_finetune.py`` with its
README's ViT-B flags) by default: AdamW at 5e-4 per 256 images (``optim.lr_rule: per_256``), layer-wise LR
decay 0.65, weight decay 0.05 (none on norms, biases, position and CLS tokens), 5 warmup epochs then cosine to
1e-6, drop path 0.1, label smoothing 0.1, the mean of the patch tokens. Mixup and cutmix are not used (the
reference uses them on ImageNet; they blend radiographs of different body regions into images no scanner makes).

Layer-wise LR decay: with ``D`` blocks, the patch embedding, position table and CLS token are layer 0, block
``i`` (0-based) is layer ``i + 1`` and everything after the blocks (final norm, pooling norm, head) is layer
``D + 1``; a parameter of layer ``l`` trains at ``optim.lr x layer_decay ** (D + 1 - l)``. The head thus has
the full rate, the last block ``decay`` times it, the embeddings ``decay ** (D + 1)`` times it.

It is the supervised task of ``radstream.train.supervised`` with another network and its parameter groups: the same
loss, validation accuracy (early stopping), test scores and ``results.json`` (row ``mae_finetune`` of
``radstream report``; ``checkpoint`` names the weights folder it started from, which the model card of
``radstream export`` looks for). One run is one (learning rate, label fraction, seed); ``optim.lr_grid`` sweeps
the rates in one command (``radstream.train.sweep``), ``slurm/submit_sweep.sh`` with ``RADSTREAM_MODULE=radstream.train.finetune``
one rate per task. Resume, stop signals and exit codes as every stage (``radstream.train.entry``).
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from omegaconf import MISSING
from timm.layers import DropPath
from torch import nn

from radstream.shards.loader import ShardLoader
from radstream.shards.manifest import read_manifest
from radstream.train import trainer
from radstream.train.config import BaseRunConfig, CheckpointConfig
from radstream.train.entry import stage_main
from radstream.train.mae import MAE, MAEConfig
from radstream.train.optim import no_weight_decay
from radstream.train.provenance import mae_run_init, manifest_bins, vit_dims
from radstream.train.run_layout import WEIGHTS
from radstream.train.steps import StepStats
from radstream.train.supervised import SupervisedOptimConfig, SupervisedTask, dataset_classes
from radstream.train.sweep import run_sweep
from radstream.train.trainer import Session
from radstream.train.weights import load_adapted, read_state_dict

logger = logging.getLogger(__name__)

POOLS = ("mean", "cls")
EXPORT_CONFIG = "config.json"
"""An exported encoder's config (``radstream export``): timm's hub format with a ``radstream`` section."""


@dataclass(frozen=True)
class FinetuneModelConfig:
    """The pretrained encoder and the head put on it."""

    init: str = MISSING
    """Where the encoder comes from: an MAE run folder, its best/ folder, a checkpoint folder, or an exported
    encoder folder (model.safetensors + config.json). Local files only."""
    drop_path_rate: float = 0.1
    """Stochastic depth of the last block (linearly less in earlier blocks, none in the first), as timm."""
    pool: str = "mean"
    """"mean": the patch tokens averaged, then a LayerNorm (the reference's global pool); "cls": the CLS token."""

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"model.pool must be one of {POOLS}, got {self.pool!r}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")


@dataclass(frozen=True)
class FinetuneOptimConfig(SupervisedOptimConfig):
    """AdamW with layer-wise LR decay. Defaults: the reference MAE fine-tuning recipe for ViT-B
    (``main_finetune.py`` with the fine-tuning README's ViT-B flags)."""

    lr: float = 5e-4
    """Peak learning rate of the head per 256 images (the reference's base LR for ViT-B; 1e-3 for ViT-L/H)."""
    lr_rule: str = "per_256"
    """The reference's rule: the peak rate is ``lr x global batch / 256``."""
    warmup_epochs: float = 5.0
    """Linear warmup length in epochs."""
    min_lr: float = 1e-6
    """Where the cosine ends."""
    label_smoothing: float = 0.1
    """Cross-entropy label smoothing."""
    layer_decay: float = 0.65
    """Layer-wise LR decay: a parameter of layer ``l`` of ``D + 1`` trains at ``lr x layer_decay ** (D + 1 - l)``
    (1: no decay). The reference's ViT-B value (0.75 is its ViT-L/H value)."""
    probe_steps: int = 0
    """LP-FT (Kumar et al., 2022, "Fine-tuning can distort pretrained features"): the first this many optimizer
    steps train only the layer after the blocks (head and its norms) on the frozen encoder, at the schedule's
    rate; then everything fine-tunes. A head trained first sends useful gradients into the encoder, where a
    random head's distort its features before the head is any good. 0: plain fine-tuning (the reference)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.layer_decay <= 1.0:
            raise ValueError(f"optim.layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.probe_steps < 0:
            raise ValueError(f"optim.probe_steps must be >= 0, got {self.probe_steps}")


@dataclass(frozen=True)
class FinetuneConfig(BaseRunConfig):
    """``radstream.train.finetune``: one fine-tuning run (or one per rate of ``optim.lr_grid``)."""

    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)
    """Early stopping (``run.patience``) watches the validation accuracy."""
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(every_steps=0, keep_last=1))
    """Checkpoint cadence and retention; by default one checkpoint, at epoch ends (a sweep has many runs)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.model.init or self.model.init == MISSING:
            raise ValueError("model.init is required: an MAE run, checkpoint or exported encoder folder")


# --------------------------------------------------------------------------------------- the encoder


def load_pretrained(source: str | Path) -> tuple[MAE, Path]:
    """The MAE of ``source`` with its weights (an exported encoder folder, or the weights of a run as
    ``radstream.train.run_layout.resolve_weights`` finds them), and the folder its weights came from.

    Raises:
        FileNotFoundError: nothing usable at ``source``.
        ValueError: an exported config without radstream's section.
    """
    source = Path(source)
    if (source / EXPORT_CONFIG).is_file():
        return _load_export(source), source
    from radstream.train.checkpoint import load_encoder

    model, _, folder = load_encoder(source)
    return model, folder


def _load_export(folder: Path) -> MAE:
    """An encoder written by ``radstream export``: timm keys, the architecture in config.json."""
    config = json.loads((folder / EXPORT_CONFIG).read_text())
    ours = config.get("radstream")
    if not isinstance(ours, dict) or "architecture" not in config:
        raise ValueError(
            f"{folder / EXPORT_CONFIG}: not an encoder exported by radstream (no radstream section)"
        )
    mae = MAE(
        MAEConfig(
            encoder=config["architecture"], embed_dim=ours["embed_dim"], depth=ours["depth"],
            num_heads=ours["num_heads"], in_chans=config.get("model_args", {}).get("in_chans", 1),
            pos_embed=ours.get("pos_embed", "sincos"),
        )
    )  # fmt: skip
    # a sin-cos encoder computes its positions per grid: the exported table (one grid) is not needed
    load_adapted(mae.encoder, read_state_dict(folder / WEIGHTS), folder)
    return mae


def set_drop_path(encoder: nn.Module, rate: float) -> None:
    """Stochastic depth rising linearly from 0 (first block) to ``rate`` (last), timm's rule."""
    blocks = list(encoder.blocks)
    for i, block in enumerate(blocks):
        p = rate * i / max(len(blocks) - 1, 1)
        block.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
        block.drop_path2 = DropPath(p) if p > 0 else nn.Identity()


class EncoderClassifier(nn.Module):
    """The MAE's encoder (its ``forward_features``: positions for every grid) with a classification head."""

    def __init__(self, mae: MAE, num_classes: int, pool: str) -> None:
        super().__init__()
        for name, _ in list(mae.named_children()):  # the decoder: not trained, not saved, unused under DDP
            if not name.startswith("encoder"):
                setattr(mae, name, None)
        for name, _ in list(mae.named_parameters(recurse=False)):  # the mask token
            setattr(mae, name, None)
        self.backbone = mae
        self.pool = pool
        dim = mae.encoder.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=1e-6) if pool == "mean" else nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # the reference's: start near uniform predictions
        nn.init.zeros_(self.head.bias)

    @property
    def depth(self) -> int:
        return len(self.backbone.encoder.blocks)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [N, C, H, W] -> logits [N, classes]."""
        tokens = self.backbone.forward_features(imgs)  # [N, 1+L, D]
        pooled = tokens[:, 1:].mean(dim=1) if self.pool == "mean" else tokens[:, 0]
        return self.head(self.fc_norm(pooled))


def build_finetune_model(cfg: FinetuneModelConfig, num_classes: int) -> tuple[EncoderClassifier, Path]:
    """The pretrained encoder of ``cfg.init`` with drop path and a fresh head for ``num_classes``, and the
    folder its weights came from."""
    mae, folder = load_pretrained(cfg.init)
    set_drop_path(mae.encoder, cfg.drop_path_rate)
    return EncoderClassifier(mae, num_classes, cfg.pool), folder


# ------------------------------------------------------------------------------- layer-wise LR decay


def layer_id(name: str, depth: int) -> int:
    """The layer of parameter ``name`` of an ``EncoderClassifier`` with ``depth`` blocks: 0 for the patch
    embedding, position table and CLS token, ``i + 1`` for block ``i``, ``depth + 1`` for the rest."""
    local = name.removeprefix("backbone.").removeprefix("encoder.")
    if local in ("cls_token", "pos_embed") or local.startswith("patch_embed."):
        return 0
    if local.startswith("blocks."):
        return int(local.split(".")[1]) + 1
    return depth + 1


def layer_scale(layer: int, depth: int, decay: float) -> float:
    """The LR multiplier of ``layer``: ``decay ** (depth + 1 - layer)``."""
    return decay ** (depth + 1 - layer)


def layer_decay_groups(model: EncoderClassifier, weight_decay: float, decay: float) -> list[dict]:
    """AdamW groups per (layer, decayed or not), each with its ``lr_scale`` (``radstream.train.optim.set_lr`` applies
    it); no weight decay as every task (``radstream.train.optim.no_weight_decay``)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        layer = layer_id(name, model.depth)
        no_decay = no_weight_decay(name, param)
        group = groups.setdefault(
            (layer, no_decay),
            {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
             "lr_scale": layer_scale(layer, model.depth, decay), "layer": layer},
        )  # fmt: skip
        group["params"].append(param)
    return [groups[k] for k in sorted(groups)]


# ------------------------------------------------------------------------------------------ the task


class FinetuneTask(SupervisedTask):
    """Fine-tuning as a trainer task: the supervised task's loss, validation, test and results, on the
    pretrained encoder with layer-wise LR decay."""

    def build_model(self) -> nn.Module:
        cfg = self.cfg
        self.class_names = dataset_classes(cfg.shards)
        model, self.weights = build_finetune_model(cfg.model, len(self.class_names))
        patch = model.backbone.patch_size
        if patch != cfg.loader.patch_size:
            raise ValueError(
                f"{cfg.model.init}: the encoder's patch size {patch} differs from loader.patch_size "
                f"{cfg.loader.patch_size}"
            )
        self.arch = model.backbone.cfg.encoder
        self.bins = manifest_bins(read_manifest(cfg.shards))
        exported = (self.weights / EXPORT_CONFIG).is_file()
        self.init = f"exported encoder {self.weights.name}" if exported else mae_run_init(
            self.weights.resolve(), model.backbone.cfg.init
        )  # fmt: skip
        return model

    def describe(self) -> tuple[str, str]:
        return "mae_finetune", self.arch

    def architecture(self, model: nn.Module) -> dict:
        return {
            "kind": "mae_finetune",
            "name": self.arch,
            **vit_dims(model.backbone.encoder),
            "bins": self.bins,
        }

    def param_groups(self, model: nn.Module) -> list[dict]:
        return layer_decay_groups(model, self.cfg.optim.weight_decay, self.cfg.optim.layer_decay)

    def step(self, s: Session, batches: list[dict]) -> StepStats:
        if s.state.step < self.cfg.optim.probe_steps:  # LP-FT's probe: the encoder's rate is 0 (the trainer
            groups = s.optimizer.param_groups  # set every group's rate just before this step); the head is
            top = max(group["layer"] for group in groups)  # the top layer (layer_id: depth + 1)
            for group in groups:
                if group["layer"] < top:
                    group["lr"] = 0.0
        return super().step(s, batches)

    def test(self, s: Session, loader: ShardLoader, reason: str, weights: str) -> tuple[dict, dict]:
        metrics, results = super().test(s, loader, reason, weights)
        results["checkpoint"] = str(self.weights.resolve())  # the model card of these weights finds it
        results["init"] = self.init  # named like the probe rows: the MAE run, and how it started
        return metrics, results


STAGE_CONFIG = FinetuneConfig
"""The config this stage loads (``radstream.workflow`` loads it the same way to count a run's steps)."""


def run(cfg: FinetuneConfig) -> int:
    """Train (or resume) the run of ``cfg`` to its end, or every rate of ``optim.lr_grid`` into its own
    ``run_dir/lr-<rate>`` (``radstream.train.sweep``); returns the exit code (0, or the first non-zero one)."""
    return run_sweep(cfg, lambda one: trainer.run(FinetuneTask(one)))


def main(argv: Sequence[str] | None = None) -> int:
    """``accelerate launch -m radstream.train.finetune --config RECIPE key=value ...``; returns the exit code."""
    return stage_main(
        argv,
        prog="accelerate launch -m radstream.train.finetune",
        description=__doc__.split("\n")[0],
        config_cls=STAGE_CONFIG,
        run=run,
        example_recipe="configs/finetune/vit.yaml",
        example_override="model.init=runs/mae",
    )


if __name__ == "__main__":
    sys.exit(main())
