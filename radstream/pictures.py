"""Pictures of a run for people: bin shapes with example images, and loss curves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bin_pictures(shards: str | Path, out: str | Path, examples: int = 4) -> list[Path]:
    """``bins.png``: images per bin shape (bar chart); ``bin_examples.png``: a few stored images per bin."""
    from radstream.shards.codecs import decode
    from radstream.shards.index import ShardReader
    from radstream.shards.manifest import read_manifest, read_samples

    plt = _pyplot()
    shards, out = Path(shards), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(shards)
    bins = manifest["bins"]
    names = [b["name"] for b in bins]
    counts = np.array([[b["counts"][s] for s in ("train", "val", "test")] for b in bins])
    fig, ax = plt.subplots(figsize=(1.2 * len(bins) + 3, 3.2))
    bottom = np.zeros(len(bins))
    for i, split in enumerate(("train", "val", "test")):
        ax.bar(names, counts[:, i], bottom=bottom, label=split)
        bottom += counts[:, i]
    ax.set_xlabel("bin shape (height x width, px)")
    ax.set_ylabel("images")
    ax.set_title(f"{manifest['binning']['strategy']} binning: {int(counts.sum())} images in {len(bins)} bins")
    ax.legend()
    fig.tight_layout()
    hist = out / "bins.png"
    fig.savefig(hist, dpi=110)
    plt.close(fig)

    table = read_samples(shards, "train", columns=["bin", "shard", "position", "label", "split"]).to_pylist()
    codec = manifest["codec"]["name"]
    ext = "jpg" if codec == "jpg" else ("png" if codec.startswith("png") else codec)
    fig, axes = plt.subplots(len(bins), examples, figsize=(2.2 * examples, 2.2 * len(bins)), squeeze=False)
    for row, name in enumerate(names):
        picks = [r for r in table if r["bin"] == name][:examples]
        for col in range(examples):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(picks):
                with ShardReader(shards / picks[col]["shard"]) as reader:
                    img = decode(reader.sample(picks[col]["position"])[ext], codec)
                ax.imshow(img, cmap="gray")
                ax.set_title(f"{name}\n{picks[col]['label'] or ''}", fontsize=8)
    fig.tight_layout()
    examples_png = out / "bin_examples.png"
    fig.savefig(examples_png, dpi=110)
    plt.close(fig)
    return [hist, examples_png]


def loss_curves(metrics_jsonl: str | Path, out_png: str | Path, title: str = "MAE pretraining") -> Path:
    """Train loss per logged step and validation loss per epoch, from a run's ``metrics.jsonl``."""
    plt = _pyplot()
    train, val = [], []
    for line in Path(metrics_jsonl).read_text().splitlines():
        rec = json.loads(line)
        if rec.get("split") == "train" and "loss" in rec:
            train.append((rec["step"], rec["loss"]))
        elif rec.get("split") == "val" and "loss" in rec:
            val.append((rec["step"], rec["loss"]))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train, strict=False), label="train loss", alpha=0.7)
    if val:
        ax.plot(*zip(*val, strict=False), "o-", label="validation loss (per epoch)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("MSE on masked patches")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)


def baseline_curves(
    runs: str | Path, out_png: str | Path, majority: float | None = None, priors: dict[float, float] | None = None
) -> Path:  # fmt: skip
    """Validation accuracy per epoch of every supervised run under ``runs`` (one panel per model, a colour per
    label fraction, a line per seed) with the majority-class rate (grey) and each fraction's prior-only rate
    (``radstream.report.report_checks.prior_rates``, dotted in the fraction's colour): a curve that stays at or below its
    fraction's line has not learned."""
    from radstream.report.report import model_label

    plt = _pyplot()
    runs = sorted(p.parent for p in Path(runs).rglob("results.json"))
    models = sorted({json.loads((r / "results.json").read_text())["model"] for r in runs})
    fig, axes = plt.subplots(1, max(len(models), 1), figsize=(5 * max(len(models), 1), 3.5), squeeze=False)
    fractions: list[float] = []
    for run in runs:
        result = json.loads((run / "results.json").read_text())
        ax = axes[0][models.index(result["model"])]
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        val = [(r["epoch"], r["acc"]) for r in rows if r.get("split") == "val" and "acc" in r]
        if result["fraction"] not in fractions:
            fractions.append(result["fraction"])
        color = f"C{fractions.index(result['fraction'])}"
        label = f"{result['fraction']:g} of the labels" if result["seed"] == 0 else None
        ax.plot(*zip(*val, strict=False), "o-", color=color, alpha=0.8, label=label, markersize=3)
        ax.set_title(f"{model_label(result['model'], result['arch'])}: validation accuracy", fontsize=9)
    for ax in axes[0]:
        if majority is not None:
            ax.axhline(majority, color="grey", linestyle="--", label="majority class")
        for fraction, rate in sorted((priors or {}).items()):
            if fraction in fractions:
                ax.axhline(rate, color=f"C{fractions.index(fraction)}", linestyle=":", linewidth=1,
                           label=f"prior only, {fraction:g}")  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylim(0, 1)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return Path(out_png)
