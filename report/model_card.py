"""The model card (``README.md``) of an exported encoder, in the layout of a Hugging Face model card.

Everything comes from the run and its data: YAML front matter (``library_name: timm``, tags, a license
placeholder for the user, ``datasets: []``), the model, how to load it, the data (manifest fingerprint, images
per split and bin, label classes), the recipe (the run's resolved config.yaml), the training curve
(metrics.jsonl), the test MSE (summary.json) and the probe / fine-tuning results of these exact weights, found
in result files whose checkpoint (or ``model.init``) is the exported weights folder.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from radstream.report.report_files import _json, _jsonl, find_results
from radstream.train.run_layout import BEST, CONFIG, METRICS, PROBE_RESULTS, RESULTS, SUMMARY


@dataclass(frozen=True)
class Source:
    """The weights an export reads: which folder, and what the card says about them."""

    run_dir: Path
    checkpoint: Path
    """What ``radstream.train.checkpoint.load_encoder`` is given: ``RUN/best`` or the run folder (its latest checkpoint)."""
    label: str
    """``best`` or ``latest``."""
    meta: dict
    """``best/meta.json`` (epoch, step, val_loss) or the checkpoint's loop state (step, epoch)."""


logger = logging.getLogger(__name__)

RESULT_FILES = (PROBE_RESULTS, RESULTS)
"""Result files searched for (``radstream.eval.probe``; supervised and fine-tuning runs)."""
TEST_MSE_LABELS = {
    "test_mse_study": "study MSE (uniform random 75% of all patches, same masks for every model, [0, 1] pixels)",
    "test_mse": "test MSE (masked patches, [0, 1] pixels)",
    "test_mse_all": "test MSE, all masked patches ([0, 1] pixels)",
    "test_mse_foreground": "test MSE, masked foreground patches ([0, 1] pixels)",
    "test_loss": "test loss (the training objective)",
    "objective": "training objective",
}
CURVE_POINTS = 20
"""Validation losses listed in the curve summary (every k-th epoch of a long run)."""
TAGS = (
    "image-feature-extraction",
    "timm",
    "vision-transformer",
    "masked-autoencoder",
    "radiography",
    "radstream",
)


def render_card(
    source: Source,
    folder: Path,
    config: dict,
    manifest: dict,
    shards_root: str,
    results: Sequence[str | Path] | None,
) -> str:
    """The whole card.

    Args:
        source: the weights exported.
        folder: the weights folder read (``RUN/best`` or ``RUN/checkpoints/step-N``).
        config: the export's config.json.
        manifest: the run's shard manifest.
        shards_root: where the shard dataset is (for the samples table).
        results: folders to search for results (None: the run's siblings).
    """
    run_dir = Path(source.run_dir)
    parts = [
        front_matter(),
        _title(config, run_dir),
        model_section(config, source),
        usage_section(config),
        data_section(manifest, shards_root),
        recipe_section(run_dir),
        curve_section(run_dir),
        evaluation_section(run_dir, folder, results),
    ]
    return "\n".join(parts)


def front_matter() -> str:
    """Hugging Face card metadata; the license is the user's to set."""
    tags = "\n".join(f"- {t}" for t in TAGS)
    return (
        "---\nlibrary_name: timm\n"
        "license: other  # placeholder: set the license of these weights and of the data they were trained on\n"
        f"tags:\n{tags}\n"
        "datasets: []  # none on the Hub: trained on the archive described below\n"
        "pipeline_tag: image-feature-extraction\n---\n"
    )


def _title(config: dict, run_dir: Path) -> str:
    rs = config["radstream"]
    return (
        f"# {config['architecture']} MAE encoder for radiographs ({run_dir.name})\n\n"
        "The encoder of a masked autoencoder (He et al., 2021) pretrained with radstream on one-channel "
        f"radiographs in {len(rs['bin_shapes'])} bin shape(s); the MAE decoder is not included. It gives "
        "features for probes, retrieval, or a detection / segmentation backbone, and can be fine-tuned.\n"
    )


def model_section(config: dict, source: Source) -> str:
    """Architecture, input and positions, and which weights these are."""
    rs, args = config["radstream"], config["model_args"]
    meta = source.meta
    if source.label == BEST:
        weights = f"best validation loss ({_num(meta.get('val_loss'))} at epoch {meta.get('epoch')}, step {meta.get('step')})"
    else:
        weights = f"latest checkpoint (step {meta.get('step')}): the run had no best/ weights yet"
    shapes = ", ".join(f"{h}x{w}" for h, w in rs["bin_shapes"])
    norm = rs["normalization"]
    rows = [
        ("timm architecture", f"`{config['architecture']}`"),
        ("width / depth / heads", f"{rs['embed_dim']} / {rs['depth']} / {rs['num_heads']}"),
        ("patch size", f"{rs['patch_size']} px"),
        ("parameters (learned)", f"{rs['num_params'] / 1e6:.2f} M"),
        ("input", f"{args['in_chans']} channel(s), {norm['input']}"),
        ("per-image normalisation (at build)", _norm_text(norm)),
        ("bin shapes trained on (H x W)", shapes),
        ("img_size of the position table", "x".join(map(str, args["img_size"]))),
        ("positions", _positions_text(rs)),
        ("weights", weights),
        ("manifest fingerprint", f"`{rs['manifest_fingerprint']}`"),
    ]
    return "## Model details\n\n" + _table(("", ""), rows) + "\n"


def _norm_text(norm: dict) -> str:
    clip = f", clipped at percentiles {norm.get('percentile_low')}-{norm.get('percentile_high')}"
    voi = ", DICOM VOI LUT applied" if norm.get("apply_voi_lut") else ""
    return f"{norm.get('per_image')}{clip if 'percentile_low' in norm else ''}{voi}"


def _positions_text(rs: dict) -> str:
    if rs["pos_embed"] == "sincos":
        return (
            "fixed 2-D sin-cos, written as a table at the most common bin; exact tables of every bin in "
            f"`{rs['pos_embed_bins']}`"
        )
    return "learned (timm's table at its native grid, resampled bicubically per input shape, as in training)"


def usage_section(config: dict) -> str:
    """How to load it in timm: the exact call, and the exact route at another bin shape."""
    rs = config["radstream"]
    h, w = rs["bin_shapes"][-1]
    return f"""## How to use

```python
import json, timm, torch
cfg = json.load(open("config.json"))
model = timm.create_model(
    cfg["architecture"], pretrained=True,
    pretrained_cfg_overlay=dict(file="model.safetensors"), **cfg["model_args"],
).eval()  # or: timm.create_model("local-dir:PATH_TO_THIS_FOLDER", pretrained=True)
images = torch.rand(2, 1, {config["model_args"]["img_size"][0]}, {config["model_args"]["img_size"][1]})  # [N, 1, H, W] in [0, 1], H and W multiples of {rs["patch_size"]}
tokens = model.forward_features(images)  # [N, 1 + (H/{rs["patch_size"]})*(W/{rs["patch_size"]}), {rs["embed_dim"]}], CLS first
cls, mean = tokens[:, 0], tokens[:, 1:].mean(dim=1)
```

Any H x W that is a multiple of the patch size runs (`dynamic_img_size`). To get exactly radstream's features
at another trained bin shape (here {h}x{w}), build the model at that shape with that bin's table:

```python
from safetensors.torch import load_file
state = load_file("model.safetensors")
state["pos_embed"] = load_file("{rs["pos_embed_bins"]}")["{h}x{w}"]
model = timm.create_model(cfg["architecture"], **{{**cfg["model_args"], "img_size": ({h}, {w})}})
model.load_state_dict(state)
```
"""


def data_section(manifest: dict, shards_root: str) -> str:
    """Fingerprint, images per split and bin, label classes with their counts."""
    bins = manifest.get("bins", [])
    splits = ("train", "val", "test")
    rows = [(b["name"], *(b.get("counts", {}).get(s, 0) for s in splits)) for b in bins]
    totals = manifest.get("split_sizes", {})
    rows.append(("**all**", *(totals.get(s, 0) for s in splits)))
    counts = manifest.get("counts", {})
    lines = [
        "## Training data\n",
        f"- shard dataset: manifest fingerprint `{manifest.get('fingerprint')}` "
        f"(created {manifest.get('created')}, codec {manifest.get('codec', {}).get('name')})",
        f"- source: {_source_text(manifest.get('privacy', {}))}: {counts.get('written')} images written, "
        f"{counts.get('rejected')} rejected, {counts.get('duplicates')} duplicates",
        f"- binning: {manifest.get('binning', {}).get('strategy')}, {len(bins)} bins\n",
        "Images per split and bin:\n",
        _table(("bin (H x W)", *splits), rows),
        "",
        class_table(manifest, shards_root),
    ]
    return "\n".join(lines) + "\n"


def _source_text(privacy: dict) -> str:
    """The source as the card may name it: its keyed fingerprint, never a path (``ingest.privacy``)."""
    text = f"fingerprint `{privacy.get('source_fingerprint')}`"
    if privacy.get("identifiers") == "kept":
        return f"{text}, **identifiers kept** (patient ids and file paths in the shards: public data only)"
    return f"{text}, patients pseudonymised (key id `{privacy.get('key_id')}`)"


def class_table(manifest: dict, shards_root: str) -> str:
    """Label classes and their images per split (labels are not used by pretraining; probes use them)."""
    names = list(manifest.get("class_names") or [])
    if not names:
        return "Label classes: none (an unlabelled dataset).\n"
    try:
        from radstream.shards.manifest import read_samples

        table = read_samples(shards_root, columns=["split", "label_index"]).to_pydict()
    except (OSError, ValueError) as err:
        logger.warning("model card: samples table of %s not read (%s)", shards_root, err)
        return f"Label classes: {', '.join(names)}.\n"
    counts = Counter(zip(table["split"], table["label_index"], strict=True))
    splits = ("train", "val", "test")
    rows = [(name, *(counts.get((s, i), 0) for s in splits)) for i, name in enumerate(names)]
    unlabelled = [sum(v for (s, i), v in counts.items() if s == split and i < 0) for split in splits]
    if any(unlabelled):
        rows.append(("(unlabelled)", *unlabelled))
    return "Label classes (images per split):\n\n" + _table(("class", *splits), rows) + "\n"


def recipe_section(run_dir: Path) -> str:
    """The run's resolved config, with every local path replaced (a card travels; the dataset is named by its
    fingerprint above)."""
    import yaml

    config = yaml.safe_load((run_dir / CONFIG).read_text())
    text = yaml.safe_dump(_without_paths(config), sort_keys=False).rstrip()
    return f"## Training procedure\n\nThe run's resolved config (`config.yaml`):\n\n```yaml\n{text}\n```\n"


def _without_paths(value):
    """``value`` with each absolute local path (a string starting with ``/`` or ``~``) as ``<local path>``."""
    if isinstance(value, dict):
        return {k: _without_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_paths(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")):
        return "<local path>"
    return value


def curve_section(run_dir: Path) -> str:
    """Epochs, steps, best and final validation loss, final training loss (metrics.jsonl, summary.json)."""
    lines = _jsonl(run_dir / METRICS)
    val = [r for r in lines if r.get("split") == "val" and "loss" in r]
    train = [r for r in lines if r.get("split") == "train" and "loss" in r]
    summary = _json(run_dir / SUMMARY)
    if not val and not train:
        return "## Training curve\n\nNo metrics.jsonl in the run.\n"
    best = min(val, key=lambda r: r["loss"]) if val else None
    rows = [
        ("epochs completed", summary.get("epochs_completed", len(val))),
        ("optimizer steps", summary.get("steps", (train or val)[-1].get("step"))),
        ("stopped", summary.get("stopped", "not finished (no summary.json)")),
        ("best validation loss", f"{_num(best['loss'])} (epoch {best['epoch']})" if best else "none"),
        ("final validation loss", f"{_num(val[-1]['loss'])} (epoch {val[-1]['epoch']})" if val else "none"),
        ("final training loss", f"{_num(train[-1]['loss'])} (step {train[-1]['step']})" if train else "none"),
    ]
    step = max(1, -(-len(val) // CURVE_POINTS))  # at most CURVE_POINTS epochs shown, the last always
    shown = val[::step] + ([val[-1]] if (len(val) - 1) % step else [])
    per_epoch = ", ".join(f"{r['epoch']}: {_num(r['loss'])}" for r in shown)
    return (
        "## Training curve\n\n"
        + _table(("", ""), rows)
        + f"\n\nValidation loss (epoch: loss): {per_epoch or 'none'}.\n"
    )


def evaluation_section(run_dir: Path, folder: Path, results: Sequence[str | Path] | None) -> str:
    """Test MSE of the run, then the probe / fine-tuning results of these weights."""
    summary = _json(run_dir / SUMMARY)
    rows = [(label, _num(summary[k])) for k, label in TEST_MSE_LABELS.items() if summary.get(k) is not None]
    rows += [
        (k, _num(v)) for k, v in summary.items() if k.startswith("test_mse") and k not in TEST_MSE_LABELS
    ]
    if rows:
        tested = summary.get("tested_weights", "?")
        head = f"On the test split ({summary.get('test_images')} images, {tested} weights):\n\n"
        mse = head + _table(("metric", "value"), rows)
    else:
        mse = "Test MSE: not measured (the run has no summary.json)."
    return "## Evaluation\n\n" + mse + "\n\n" + results_text(run_dir, folder, results) + "\n"


def results_text(run_dir: Path, folder: Path, results: Sequence[str | Path] | None) -> str:
    """Probe / kNN / fine-tuning accuracy of these weights (``radstream report``'s LR selection), or "not
    evaluated"."""
    from radstream.report.report import select_best
    from radstream.report.report_files import collect

    files = find_results(run_dir, folder, results)
    try:
        selections = select_best(collect(files)) if files else []
    except ValueError as err:  # e.g. the same head in two result files: no one selection is right
        logger.warning("model card: results not summarised: %s", err)
        return f"Linear probe and fine-tuning: results found but not summarised ({err})."
    if not selections:
        return "Linear probe, kNN and fine-tuning: not evaluated (no result file refers to these weights)."
    rows = [
        (_model_label(s.model), f"{s.fraction:.0%}", f"{s.test_acc_mean:.4f} ± {s.test_acc_std:.4f}",
         f"{s.lr:.3g}", len(s.seeds))
        for s in selections
    ]  # fmt: skip
    where = ", ".join(f"`{f}`" for f in files)
    return (
        "Classification with these weights (test top-1, mean ± std over seeds at the learning rate with the "
        "best validation accuracy):\n\n"
        + _table(("model", "labels", "test top-1", "chosen LR", "seeds"), rows)
        + f"\n\nFrom {where}. kNN: not evaluated."
    )


def _model_label(model: str) -> str:
    if model.startswith("probe_"):
        return f"linear probe ({model.removeprefix('probe_')})"
    return f"fine-tuned ({model}, initialised from these weights)"


def _num(value) -> str:
    return f"{value:.6g}" if isinstance(value, (int, float)) else str(value)


def _table(header: Sequence[str], rows: Iterable[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
