"""Classifiers for the supervised baselines: timm ViT / ResNet for 1-channel images, initialised from local
weights only (timm/ImageNet state dicts or an MAE checkpoint's encoder)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import timm
import torch
from torch import nn

from train.checkpoint import read_state_dict

if TYPE_CHECKING:  # train.supervised imports this module; its config is only needed for annotations here
    from train.supervised import ClassifierConfig

logger = logging.getLogger(__name__)


def build_classifier(cfg: ClassifierConfig, num_classes: int) -> nn.Module:
    """The timm network for 1-channel images and ``num_classes`` outputs, initialised from ``cfg.init``.

    Raises:
        FileNotFoundError: ``cfg.init`` names no file.
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
        load_classifier_init(model, cfg.init)
    return model


def adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit foreign weights to ``model``: MAE encoder keys unprefixed, RGB convolutions summed to the model's
    channels, a learned position table resampled to the model's grid, the classifier head dropped."""
    from timm.layers import resample_abs_pos_embed
    from timm.models import adapt_input_conv

    if any(k.startswith("encoder.") for k in state):  # an MAE checkpoint: keep its encoder
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    head = model.pretrained_cfg.get("classifier") or "head"
    own = model.state_dict()
    out = {}
    for key, value in state.items():
        if key.startswith(f"{head}.") or key not in own:
            continue
        target = own[key].shape
        if value.ndim == 4 and value.shape[1] != target[1] and value.shape[0] == target[0]:
            value = adapt_input_conv(target[1], value)  # 3 → 1 channel: sum over RGB
        elif key == "pos_embed" and value.shape != target:
            prefix = getattr(model, "num_prefix_tokens", 1)
            value = resample_abs_pos_embed(value, list(model.patch_embed.grid_size), num_prefix_tokens=prefix)
        if value.shape != target:
            raise ValueError(
                f"init weight {key}: shape {tuple(value.shape)} does not fit the model's {tuple(target)}"
            )
        out[key] = value
    return out


def load_classifier_init(model: nn.Module, path: str | Path) -> list[str]:
    """Initialise ``model`` from a local weights file; returns the model keys left at random init.

    Raises:
        FileNotFoundError: no file at ``path`` (weights are never downloaded).
        ValueError: the file fits less than half of the model (the wrong architecture).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"init weights {str(path)!r} not found: weights are read from local files only"
        )
    state = adapt_state(model, read_state_dict(path))
    missing = [k for k in model.state_dict() if k not in state]
    if len(state) < len(missing):
        raise ValueError(f"{path}: fits only {len(state)} of {len(model.state_dict())} weights of the model")
    model.load_state_dict(state, strict=False)
    if missing:
        logger.info("init %s: %d weights left random (e.g. %s)", path, len(missing), ", ".join(missing[:4]))
    return missing
