"""What a reported model is: its architecture (width x depth, patch, input bins) and its initialisation, as
every result file records them and every report row names them, beside the reference study's.

The study (ARCHITECTURE.md §1): ViT-B/16 (768 wide, 12 blocks, 16-pixel patches) for the supervised ViT and the
MAE encoder, ResNet50, every image resized to 224x224, and every network initialised from ImageNet weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

TIMM_PREFIX = "timm:"
"""``model.init`` of a timm pretrained tag, read from the local Hugging Face cache only."""

STUDY_BINS = ("224x224",)
"""The study's input: one shape."""
STUDY_ARCH = {
    "vit": {"width": 768, "depth": 12, "patch": 16},
    "mae": {"width": 768, "depth": 12, "patch": 16},
    "mae_finetune": {"width": 768, "depth": 12, "patch": 16},
    "cnn": {"name": "resnet50"},
    "resnet50": {"name": "resnet50"},  # the CNN's kind in result files of earlier versions
}
"""The study's networks, per row kind (``mae``: the encoder behind the probe and kNN rows; ``mae_finetune``:
the same encoder fine-tuned)."""
STUDY_INIT = "ImageNet"


def manifest_bins(manifest: dict) -> list[str]:
    """The bin names (``HxW``) of a shard dataset's manifest."""
    return sorted(b["name"] for b in manifest.get("bins", []))


def vit_dims(model: nn.Module) -> dict:
    """Width, depth and patch side of a timm ViT (or of an MAE's ``encoder``)."""
    return {
        "width": int(model.embed_dim),
        "depth": len(model.blocks),
        "patch": int(model.patch_embed.patch_size[0]),
    }


def encoder_dims(model_cfg: dict) -> dict:
    """Width, depth and patch of the MAE encoder a pretraining config's ``model`` section describes (the timm
    network built on the meta device: no memory, no weights)."""
    import timm

    overrides = {k: model_cfg[k] for k in ("embed_dim", "depth", "num_heads") if model_cfg.get(k) is not None}
    import torch

    with torch.device("meta"):
        encoder = timm.create_model(model_cfg["encoder"], pretrained=False, **overrides)
    return vit_dims(encoder)


def classifier_architecture(kind: str, arch: str, model: nn.Module, bins: list[str]) -> dict:
    """The ``architecture`` entry of a supervised results.json."""
    dims = vit_dims(model) if kind == "vit" else {"name": arch}
    return {"kind": kind, "name": arch, **dims, "bins": list(bins)}


def init_name(init: str | None) -> str:
    """How a network was initialised: "scratch", the timm tag, "MAE run <folder>" or "weights <file>"."""
    if init is None:
        return "scratch"
    if init.startswith(TIMM_PREFIX):
        return init
    path = Path(init)
    parts = path.parts
    if "checkpoints" in parts or path.name == "best" or path.parent.name == "best":
        run = parts[parts.index("checkpoints") - 1] if "checkpoints" in parts else path.parent.name
        return f"MAE run {run}"
    return f"weights {path.name}"


def mae_run_init(weights: Path, mae_init: str | None) -> str:
    """The init of a row built on MAE weights (probes, kNN, fine-tuning), one wording for all: "MAE run <run>
    (from <how that run started>)"; ``weights`` is the run's ``best/`` or checkpoint folder."""
    run = weights.parents[1].name if weights.parent.name == "checkpoints" else weights.parent.name
    return f"MAE run {run} (from {init_name(mae_init)})"


def mae_provenance(attrs: dict) -> dict:
    """``architecture`` and ``init`` of the probe and kNN rows, from an embedding store's attrs: the MAE
    encoder that made the embeddings and the run it came from (and how that run started)."""
    from radstream.shards.manifest import read_manifest

    config = attrs.get("checkpoint_config") or {}
    model_cfg = config.get("model", {})
    try:
        bins = manifest_bins(read_manifest(attrs["shards"]))
    except (FileNotFoundError, KeyError, ValueError):
        bins = []
    arch = {"kind": "mae", "name": model_cfg.get("encoder", "?"), "bins": bins}
    if "encoder" in model_cfg:
        arch.update(encoder_dims(model_cfg))
    init = mae_run_init(Path(str(attrs.get("checkpoint", "?"))), model_cfg.get("init"))
    return {"architecture": arch, "init": init}


def architecture_text(arch: dict | None) -> str:
    """E.g. "ViT 768×12, patch 16, 224x224" or "resnet50, 3 bins (64x96 … 96x64)"; "?" when unknown."""
    if not arch:
        return "?"
    bins = arch.get("bins") or []
    shapes = bins[0] if len(bins) == 1 else f"{len(bins)} bins ({bins[0]} … {bins[-1]})" if bins else "? bins"
    if "width" in arch:
        return f"ViT {arch['width']}×{arch['depth']}, patch {arch['patch']}, {shapes}"
    return f"{arch.get('name', '?')}, {shapes}"


def differences(arch: dict | None, init: str | None) -> list[str]:
    """Where a row's network differs from the study's: each as "what ours (study: theirs)"."""
    out = []
    study = STUDY_ARCH.get((arch or {}).get("kind", ""), {})
    for key, value in study.items():
        if arch is not None and arch.get(key) != value:
            out.append(f"{key} {arch.get(key)} (study: {value})")
    if arch is not None and tuple(arch.get("bins") or ()) != STUDY_BINS:
        out.append(f"input {len(arch.get('bins') or [])} bins (study: 224x224)")
    if init is not None and "scratch" in init:
        out.append(f"init {init} (study: {STUDY_INIT})")
    return out
