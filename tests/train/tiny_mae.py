"""The tiny MAE the model tests build (32 wide, 2 blocks): seconds on a CPU."""

from __future__ import annotations

import dataclasses

import torch

from radstream.train.mae import MAEConfig, build_mae

TINY = MAEConfig(
    encoder="vit_tiny_patch16_224",
    embed_dim=32,
    depth=2,
    num_heads=2,
    decoder_dim=32,
    decoder_depth=1,
    decoder_heads=2,
)


def tiny_mae(**changes) -> torch.nn.Module:
    """``TINY`` with ``changes``, built from seed 0 (in training mode)."""
    torch.manual_seed(0)
    return build_mae(dataclasses.replace(TINY, **changes))
