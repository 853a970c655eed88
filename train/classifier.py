"""Classifiers for the supervised baselines: timm ViT / ResNet for 1-channel images, initialised from local
weights only (timm/ImageNet state dicts or an MAE checkpoint's encoder, fitted by ``radstream.train.weights``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import timm
from torch import nn

from radstream.train.weights import load_adapted, read_state_dict

KINDS = ("vit", "cnn")
RENAMED_KINDS = {"resnet50": "cnn"}
"""Kinds of earlier versions: ``resnet50`` named the row, not the network (it held resnet18 in the demo)."""


@dataclass(frozen=True)
class ClassifierConfig:
    """The network."""

    kind: str = "vit"
    """Which baseline this is, the row of the result tables: "vit" or "cnn" (the network is ``arch``)."""
    arch: str = "vit_base_patch16_224"
    """timm model name (created with pretrained=False, in_chans=1): a ViT for "vit"; resnet50 (the study's),
    resnet10t (the demo's and the tests') for "cnn"."""
    embed_dim: int | None = None
    """ViT only: override the width (with depth and num_heads: a tiny debug ViT)."""
    depth: int | None = None
    """ViT only: override the number of blocks."""
    num_heads: int | None = None
    """ViT only: override the attention heads."""
    drop_path_rate: float = 0.0
    """Stochastic depth."""
    init: str | None = None
    """Local weights file to start from (timm/ImageNet state dict, or an MAE checkpoint for the ViT); None:
    random initialisation."""

    def __post_init__(self) -> None:
        if self.kind in RENAMED_KINDS:
            raise ValueError(
                f"model.kind {self.kind!r} is now {RENAMED_KINDS[self.kind]!r} (the network is model.arch, "
                f"e.g. model.kind=cnn model.arch=resnet50)"
            )
        if self.kind not in KINDS:
            raise ValueError(f"model.kind must be one of {KINDS}, got {self.kind!r}")
        if not timm.is_model(self.arch):
            raise ValueError(f"model.arch {self.arch!r} is not a timm model name")
        overrides = (self.embed_dim, self.depth, self.num_heads)
        if self.kind != "vit" and any(v is not None for v in overrides):
            raise ValueError("model.embed_dim, depth and num_heads apply to the ViT only")


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
    """The timm network for 1-channel images and ``num_classes`` outputs, initialised from ``cfg.init``.

    Raises:
        FileNotFoundError: ``cfg.init`` names no file.
        ValueError: ``cfg.init`` fits less than half of the network.
    """
    kwargs: dict = {"pretrained": False, "in_chans": 1, "num_classes": num_classes}
    if cfg.drop_path_rate:
        kwargs["drop_path_rate"] = cfg.drop_path_rate
    if cfg.kind == "vit":
        kwargs["dynamic_img_size"] = True  # positions resampled per batch: every bin shape trains as it is
        kwargs.update(
            {k: v for k in ("embed_dim", "depth", "num_heads") if (v := getattr(cfg, k)) is not None}
        )
    model = timm.create_model(cfg.arch, **kwargs)
    if cfg.init is not None:
        load_adapted(model, read_state_dict(cfg.init), Path(cfg.init))
    return model
