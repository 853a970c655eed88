"""``radstream export RUN OUT``: the encoder of an MAE pretraining run as plain timm weights, with a model card.

OUT gets:

- ``model.safetensors``: the encoder's state dict under timm's own key names (the MAE's decoder and mask token
  dropped), loadable by ``timm.create_model(architecture, pretrained=True,
  pretrained_cfg_overlay=dict(file=OUT/model.safetensors), **model_args)`` or ``timm.create_model(
  "local-dir:OUT", pretrained=True)``;
- ``config.json``: timm's hub format (``architecture``, ``num_classes``, ``num_features``, ``global_pool``,
  ``model_args``, ``pretrained_cfg``) plus a ``radstream`` section: bin shapes, position-embedding kind,
  normalisation, the run and the weights it came from;
- ``pos_embed_bins.safetensors``: the exact position table of every bin shape the run trained on (``"HxW"`` →
  ``[1, prefix + h*w, D]``), for features identical to radstream's at any trained shape;
- ``README.md``: the model card (``radstream.report.model_card``).

Positions. A timm ViT holds one learned table for one grid and, with ``dynamic_img_size=True``, resamples it
bicubically for other grids. radstream's ``sincos`` encoder computes fixed 2-D sin-cos positions per grid
instead: the export writes them at the most common training bin (``img_size``), so features there are
identical; at other shapes timm's bicubic resampling of that table approximates them (as MAE's own fine-tuning
code does for a new resolution), while the bin's table from ``pos_embed_bins.safetensors`` reproduces them
exactly. A ``learned`` encoder is written with its native table and ``img_size``: timm then resamples it
exactly as radstream does, at every shape. The CLS token carries no position in radstream's sin-cos encoder:
its row of the table is zero.

Weights: ``RUN/best`` (the best validation epoch, what the study tested); a run without it (stopped before its
first validation) falls back to its latest checkpoint, with a warning, and the card says so.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from omegaconf import OmegaConf

from radstream.core.atomic import write_bytes, write_text
from radstream.report.model_card import Source, render_card
from radstream.train.checkpoint import load_encoder
from radstream.train.mae import MAE
from radstream.train.pos_embed import resample_learned, sincos_2d
from radstream.train.run_layout import BEST, CHECKPOINTS, CONFIG, META, WEIGHTS, resolve_weights

logger = logging.getLogger(__name__)

CONFIG_JSON = "config.json"
BIN_TABLES = "pos_embed_bins.safetensors"
CARD = "README.md"
FORMATS = ("timm", "hf")


@dataclass(frozen=True)
class BinShape:
    """One bin shape of the training data."""

    height: int
    width: int
    train_images: int

    @property
    def name(self) -> str:
        return f"{self.height}x{self.width}"


def find_source(run_dir: str | Path) -> Source:
    """The weights to export: the weights of the run (``radstream.train.run_layout.resolve_weights``: ``RUN/best``, else
    the latest checkpoint, with a warning).

    Raises:
        FileNotFoundError: ``run_dir`` is not a pretraining run, or holds no weights.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise FileNotFoundError(f"{run_dir}: not a pretraining run folder (no {CONFIG})")
    model = OmegaConf.load(run_dir / CONFIG).get("model") or {}
    if "encoder" not in model or "mask_ratio" not in model:
        raise ValueError(
            f"{run_dir / CONFIG}: not an MAE pretraining run (no model.encoder / model.mask_ratio)"
        )
    weights = resolve_weights(run_dir)
    if weights.label == "given":  # a run folder without best/ or checkpoints/
        raise FileNotFoundError(f"{run_dir}: no {BEST}/{WEIGHTS} and no complete checkpoint to export")
    if weights.label == "best":
        meta = json.loads((weights.folder / META).read_text()) if (weights.folder / META).is_file() else {}
        return Source(run_dir, weights.folder, "best", meta)
    logger.warning("%s: no %s/%s (no validation epoch yet); exporting %s", run_dir, BEST, WEIGHTS,
                   weights.folder.name)  # fmt: skip
    return Source(run_dir, run_dir, "latest", json.loads((weights.folder / "loop_state.json").read_text()))


def bin_shapes(manifest: dict, patch_size: int) -> list[BinShape]:
    """The dataset's bin shapes, most training images first (ties: the manifest's order).

    Raises:
        ValueError: a shape that is not a multiple of the patch size, or a dataset without bins.
    """
    shapes: dict[tuple[int, int], int] = {}
    for b in manifest.get("bins", []):
        key = (int(b["height"]), int(b["width"]))
        shapes[key] = shapes.get(key, 0) + int(b.get("counts", {}).get("train", 0))
    if not shapes:
        raise ValueError("the run's shard manifest lists no bins")
    bad = [f"{h}x{w}" for h, w in shapes if h % patch_size or w % patch_size]
    if bad:
        raise ValueError(f"bin shapes {bad} are not multiples of the encoder's patch size {patch_size}")
    ordered = sorted(shapes.items(), key=lambda kv: -kv[1])  # stable: manifest order among equals
    return [BinShape(h, w, n) for (h, w), n in ordered]


def num_prefix_rows(encoder: torch.nn.Module) -> int:
    """Rows of a timm position table before the patch rows: the CLS row, unless the model adds none there."""
    return 0 if getattr(encoder, "no_embed_class", False) else 1


def position_table(model: MAE, grid_hw: tuple[int, int]) -> torch.Tensor:
    """``[1, prefix + h*w, D]`` float32: the positions radstream's encoder adds at ``grid_hw``, in timm's
    layout (prefix rows zero for sin-cos: radstream gives the CLS token no position)."""
    enc = model.encoder
    prefix = num_prefix_rows(enc)
    if model.cfg.pos_embed == "sincos":
        table = sincos_2d(enc.embed_dim, grid_hw)
        return torch.cat([table.new_zeros(prefix, enc.embed_dim), table])[None]
    with torch.no_grad():
        return resample_learned(enc.pos_embed, enc.patch_embed.grid_size, grid_hw, prefix).float().clone()


def encoder_state(model: MAE, main: BinShape) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm's key names; sin-cos positions written as the table at ``main``."""
    state = {k: v.detach().clone().contiguous() for k, v in model.encoder.state_dict().items()}
    if model.cfg.pos_embed == "sincos":
        p = model.patch_size
        state["pos_embed"] = position_table(model, (main.height // p, main.width // p))
    return state


def model_args(model: MAE, main: BinShape) -> dict:
    """The ``timm.create_model`` keyword arguments that rebuild the exported encoder."""
    cfg, enc = model.cfg, model.encoder
    if cfg.pos_embed == "sincos":
        img_size = [main.height, main.width]
    else:
        img_size = [int(s) for s in enc.patch_embed.img_size]  # the learned table's native grid
    overrides = {k: v for k in ("embed_dim", "depth", "num_heads") if (v := getattr(cfg, k)) is not None}
    return {
        "in_chans": cfg.in_chans,
        "num_classes": 0,
        "global_pool": "token",
        "img_size": img_size,
        "dynamic_img_size": True,
        **overrides,
    }


def timm_config(model: MAE, shapes: Sequence[BinShape], manifest: dict, source: Source, folder: Path) -> dict:
    """config.json: timm's hub format plus the ``radstream`` section (``folder``: the weights read)."""
    main, enc = shapes[0], model.encoder
    args = model_args(model, main)
    norm = dict(manifest.get("normalization") or {})
    pretrained_cfg = {
        "tag": "radstream_mae",
        "custom_load": False,
        "input_size": [model.cfg.in_chans, main.height, main.width],
        "fixed_input_size": False,
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": [0.0] * model.cfg.in_chans,
        "std": [1.0] * model.cfg.in_chans,
        "num_classes": 0,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "description": "MAE-pretrained radiograph encoder exported by radstream",
    }
    radstream = {
        "pos_embed": model.cfg.pos_embed,
        "pos_embed_grid": [args["img_size"][0] // model.patch_size, args["img_size"][1] // model.patch_size],
        "pos_embed_bins": BIN_TABLES,
        "patch_size": model.patch_size,
        "embed_dim": enc.embed_dim,
        "depth": len(enc.blocks),
        "num_heads": enc.blocks[0].attn.num_heads,
        "bin_shapes": [[s.height, s.width] for s in shapes],
        "train_images_per_shape": {s.name: s.train_images for s in shapes},
        "normalization": {
            "input": "float in [0, 1] (stored value / max), no mean/std normalisation (mean 0, std 1)",
            "per_image": norm.get("method", "min-max to [0, 1]"),
            **{k: v for k, v in norm.items() if k != "method"},
        },
        "run_dir": str(source.run_dir.resolve()),
        "weights": source.label,
        "weights_meta": source.meta,
        "checkpoint": str(folder.resolve()),
        "num_params": sum(p.numel() for p in enc.parameters()),
        "manifest_fingerprint": manifest.get("fingerprint"),
    }
    return {
        "architecture": model.cfg.encoder,
        "num_classes": 0,
        "num_features": enc.embed_dim,
        "global_pool": "token",
        "model_args": args,
        "pretrained_cfg": pretrained_cfg,
        "radstream": radstream,
    }


def check_loads(config: dict, state: dict[str, torch.Tensor]) -> None:
    """Build the timm model ``config`` describes and load ``state`` strictly: every key and shape as timm has
    them (raises RuntimeError otherwise)."""
    net = timm.create_model(config["architecture"], pretrained=False, **config["model_args"])
    net.load_state_dict(state, strict=True)


def check_out(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse a non-empty OUT unless ``force`` (then only the export's own files are replaced), and never write
    over the run's own weights (the run folder, best/ or checkpoints/)."""
    run = run_dir.resolve()
    if out.resolve() in (run, run / BEST) or run / CHECKPOINTS in out.resolve().parents:
        raise FileExistsError(f"{out}: is the run's own folder or weights; export to a folder of its own")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out}: exists and is not empty (use --force to overwrite the export's files)")


def hf_unavailable() -> str:
    """Why ``--format hf`` cannot run: the one-line message."""
    has = importlib.util.find_spec("transformers") is not None
    need = "" if has else " and the `transformers` package (not installed; radstream does not depend on it)"
    return (
        f"--format hf is not available: it needs a converter to Hugging Face ViTModel key names{need}; "
        "export timm weights (the default) and see README 'Use your encoder' for what maps"
    )


def export(
    run_dir: str | Path,
    out: str | Path,
    *,
    results: Sequence[str | Path] | None = None,
    shards: str | None = None,
    force: bool = False,
    fmt: str = "timm",
) -> dict:
    """Write the encoder of ``run_dir`` into ``out`` (weights, config.json, bin tables, model card).

    Args:
        run_dir: a ``radstream.train.pretrain`` run folder.
        out: the export folder (created; must be empty unless ``force``).
        results: folders searched for probe / fine-tuning results of the exported weights (default: the run
            folder's siblings).
        shards: the shard dataset, when the run's ``shards`` path has moved.
        force: replace the export's files in a non-empty ``out``.
        fmt: "timm" (the only format implemented).

    Returns:
        The config.json written.

    Raises:
        FileNotFoundError, FileExistsError, ValueError: bad input, as one line; nothing is written then.
    """
    from radstream.shards.manifest import read_manifest

    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r} (one of {', '.join(FORMATS)})")
    if fmt == "hf":
        raise ValueError(hf_unavailable())
    out = Path(out)
    check_out(out, Path(run_dir), force)
    source = find_source(run_dir)
    model, run_config, folder = load_encoder(source.checkpoint)
    shards_root = shards or run_config.get("shards")
    try:
        manifest = read_manifest(shards_root)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{err}; pass --shards if the run's dataset moved") from None
    shapes = bin_shapes(manifest, model.patch_size)
    state = encoder_state(model, shapes[0])
    config = timm_config(model, shapes, manifest, source, folder)
    check_loads(config, state)
    p = model.patch_size
    tables = {s.name: position_table(model, (s.height // p, s.width // p)) for s in shapes}
    card = render_card(source, folder, config, manifest, shards_root, results)

    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    write_bytes(out / WEIGHTS, save(state, metadata={"format": "pt"}))
    write_bytes(out / BIN_TABLES, save(tables, metadata={"format": "pt"}))
    write_text(out / CONFIG_JSON, json.dumps(config, indent=1) + "\n")
    write_text(out / CARD, card)
    return config
