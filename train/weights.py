"""Foreign weights for our timm models: read a local file, fit it to the model, load it.

One adapter for every network that starts from someone else's weights: the MAE encoder (``radstream.train.mae``) and the
supervised classifiers (``radstream.train.classifier``). Weights come from local files only, never the network: a path,
or a timm pretrained tag ``timm:<model>.<tag>`` (e.g. ``timm:resnet50.a1_in1k``) found in the local Hugging Face
cache (``HF_HUB_CACHE``; a workstation that downloaded it, or a cache copied to the cluster).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import torch
from timm.models import adapt_input_conv
from torch import nn

from radstream.train.pos_embed import resample_learned
from radstream.train.provenance import TIMM_PREFIX
from radstream.train.run_layout import WEIGHTS

logger = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat state dict from a local .safetensors or torch file, unwrapped from "model"/"state_dict" and from
    the "module." (DDP) and "_orig_mod." (torch.compile) prefixes.

    Raises:
        FileNotFoundError: no file at ``path``, or a ``timm:`` tag not in the local cache (weights are never
            downloaded).
    """
    path = (
        resolve_timm_tag(str(path)[len(TIMM_PREFIX) :]) if str(path).startswith(TIMM_PREFIX) else Path(path)
    )
    if not path.is_file():
        raise FileNotFoundError(
            f"init weights {str(path)!r} not found: weights are read from local files only, never downloaded"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    for prefix in ("module.", "_orig_mod."):
        state = {k.removeprefix(prefix): v for k, v in state.items()}
    return state


def resolve_timm_tag(tag: str) -> Path:
    """The local file of timm's pretrained ``tag`` (``resnet50.a1_in1k``, or ``resnet50`` for its default) in
    the Hugging Face cache (``HF_HUB_CACHE``, read now; else the hub's default), offline: never downloaded.

    Raises:
        FileNotFoundError: the tag is not a timm pretrained tag, or its weights are not in the cache.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(tag)
    repo = getattr(cfg, "hf_hub_id", None) if cfg is not None else None
    if not repo:
        raise FileNotFoundError(f"model.init {TIMM_PREFIX}{tag}: not a timm pretrained tag with hub weights")
    cache = os.environ.get("HF_HUB_CACHE") or constants.HF_HUB_CACHE
    for name in (WEIGHTS, "pytorch_model.bin"):
        found = try_to_load_from_cache(repo, name, cache_dir=cache)
        if isinstance(found, str):
            return Path(found)
    raise FileNotFoundError(
        f"model.init {TIMM_PREFIX}{tag}: {repo} is not in the local Hugging Face cache {cache} (weights are "
        f"never downloaded here: `huggingface-cli download {repo}` where there is internet, copy the cache)"
    )


def adapt_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fit foreign weights to a timm ``model``: MAE encoder keys unprefixed, RGB convolutions summed to the
    model's channels, a learned position table resampled to the model's grid, the classifier head dropped.
    Keys the model does not have are left out."""
    return _fit(model, state)[0]


def load_adapted(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> tuple[list[str], list[str]]:
    """Initialise ``model`` from ``state`` (read from ``path``) through ``adapt_state``.

    Returns:
        (model keys left at random init, file keys not used).

    Raises:
        ValueError: the file fits less than half of the model (the wrong architecture), or a weight's shape
            does not fit.
    """
    state, unused = _fit(model, state)
    missing = [k for k in model.state_dict() if k not in state]
    if len(state) < len(missing):
        raise ValueError(f"{path}: fits only {len(state)} of {len(model.state_dict())} weights of the model")
    model.load_state_dict(state, strict=False)
    if missing:
        logger.info("init %s: %d weights left random (e.g. %s)", path, len(missing), ", ".join(missing[:4]))
    if unused:
        logger.warning("init %s: checkpoint keys not used: %s", path, unused)
    return missing, unused


def _fit(model: nn.Module, state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the weights that fit ``model``, the keys left out that were neither the head nor a position table)."""
    if any(k.startswith("encoder.") for k in state):  # an MAE checkpoint: keep its encoder
        state = {k.removeprefix("encoder."): v for k, v in state.items() if k.startswith("encoder.")}
    head = model.pretrained_cfg.get("classifier") or "head"
    own = model.state_dict()
    out, unused = {}, []
    for key, value in state.items():
        if key.startswith(f"{head}."):
            continue  # another task's classifier
        if key not in own:
            if key == "pos_embed":  # the model makes its positions itself (sin-cos)
                logger.info("init: the checkpoint's learned position table is not used (the model has none)")
            else:
                unused.append(key)
            continue
        out[key] = _fit_tensor(model, key, value, own[key].shape)
    return out, unused


def _fit_tensor(model: nn.Module, key: str, value: torch.Tensor, target: torch.Size) -> torch.Tensor:
    """One weight fitted to the model's shape ``target``: input channels, position grid."""
    if value.ndim == 4 and value.shape[1] != target[1] and value.shape[0] == target[0]:
        value = adapt_input_conv(target[1], value)  # 3 → 1 channel: sum over RGB
    elif key == "pos_embed" and value.shape != target:
        prefix = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        side = math.isqrt(value.shape[1] - prefix)
        if side * side != value.shape[1] - prefix:
            raise ValueError(f"checkpoint pos_embed {tuple(value.shape)} is not a square grid")
        value = resample_learned(value, (side, side), model.patch_embed.grid_size, prefix)
    if value.shape != target:
        raise ValueError(
            f"init weight {key}: shape {tuple(value.shape)} does not fit the model's {tuple(target)}"
        )
    return value


def load_init(model: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Initialise from a local checkpoint (never the network).

    An MAE checkpoint (a dict whose "model" state dict has ``encoder.`` keys) loads the whole model, strictly.
    Anything else is read as timm ViT weights for the encoder, fitted by ``radstream.train.weights.adapt_state`` (RGB
    patch-embedding weights summed over the input channels, the learned position table resampled to ours or
    dropped for sin-cos, the classifier head dropped); missing and unused keys are logged.

    Returns:
        (missing keys, unexpected keys).

    Raises:
        FileNotFoundError: no file at ``path``.
    """
    state = read_state_dict(path)
    if any(k.startswith("encoder.") for k in state):
        result = model.load_state_dict(state, strict=True)
        logger.info("loaded MAE checkpoint %s (encoder and decoder)", path)
        return list(result.missing_keys), list(result.unexpected_keys)
    missing, unexpected = load_adapted(model.encoder, state, Path(path))
    logger.info("loaded timm ViT weights %s into the encoder", path)
    return missing, unexpected
