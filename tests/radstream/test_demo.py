"""The demo pipeline end to end at tiny sizes: every artefact exists and is sane, and a rerun reuses stages."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from PIL import Image

from radstream.cli import main


@pytest.mark.slow
def test_tiny_demo_end_to_end(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    assert main(["demo", str(out), "--tiny", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "Table 1: full data" in printed and "Table 2: 1% of the labels" in printed

    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    c = manifest["counts"]
    assert c["seen"] == c["written"] + c["rejected"] + c["duplicates"] and c["written"] > 60

    # The MAE learned: validation loss of the last epoch well below the first.
    val = [json.loads(line) for line in (out / "runs" / "mae" / "metrics.jsonl").read_text().splitlines()]
    val = [r["loss"] for r in val if r.get("split") == "val"]
    assert len(val) >= 2 and val[-1] < 0.9 * val[0]

    # The tables parse: the study's rows, an accuracy in [0, 1] in each.
    rows = {}
    for line in (out / "results" / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("Model", "---"):
            rows.setdefault(cells[0], []).append(float(cells[1].split("±")[0]))
    # the flattened rows name their token grid, e.g. "MAE probe (flattened (resampled to 4×4))"
    flat = {name for name in rows if name.startswith(("MAE probe (flattened (", "MAE kNN (flattened ("))}
    assert len(flat) == 2 and all(name.endswith("))") for name in flat)
    assert set(rows) - flat == {
        "CNN baseline (resnet18)",
        "ViT",
        "MAE probe (mean)",
        "MAE probe (CLS)",
        "MAE kNN (CLS)",
        "MAE kNN (mean)",
        "MAE fine-tuned",
    }
    assert len(rows["MAE fine-tuned"]) == 3  # fine-tuned at 1%, 10% and 100% of the labels
    assert all(0.0 <= acc <= 1.0 for accs in rows.values() for acc in accs)
    seeds = {}  # the probe rows have 2 seeds in the tiny demo (its trained models run one each)
    for line in (out / "results" / "results.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| MAE probe"):
            seeds.setdefault(cells[0], []).append(int(cells[4]))
    assert seeds and all(n >= 2 for ns in seeds.values() for n in ns)
    assert (out / "results" / "results.csv").read_text().count("\n") >= 13

    pictures = {p.name for p in (out / "pictures").glob("*.png")}
    assert {
        "bins.png",
        "bin_examples.png",
        "mae_loss.png",
        "accuracy_vs_fraction.png",
        "confusion_matrix.png",
        "baseline_curves.png",
    } <= pictures
    assert any(name.startswith("reconstructions_") for name in pictures)
    for png in (out / "pictures").glob("*.png"):
        with Image.open(png) as im:
            im.verify()

    # A rerun reuses every finished stage (no training again).
    start = time.perf_counter()
    assert main(["demo", str(out), "--tiny", "--workers", "1"]) == 0
    assert time.perf_counter() - start < 30
    assert "demo: train." not in capsys.readouterr().out  # no training stage ran again


def test_full_demo_trains_two_seeds_of_each_baseline_and_enough_steps(tmp_path: Path, monkeypatch) -> None:
    """Every baseline row of the full demo has 2 seeds; a small label fraction trains more epochs, so that
    a network from scratch gets a minimum number of optimizer steps, counted on the fraction's schedule (one
    bin per batch: 8 images in 4 bins are 4 steps an epoch, not 1)."""
    from types import SimpleNamespace

    import radstream.demo as demo
    import radstream.stages as stages
    import train.supervised  # noqa: F401 (the stage loads its config: imported before load_split is patched)

    calls = []
    monkeypatch.setattr(stages, "run_stage", lambda stage, args, log, prefix: calls.append(
        dict(a.split("=", 1) for a in args if "=" in a)))  # fmt: skip
    monkeypatch.setattr(stages, "world_size", lambda: 1)
    bins = ("80x192", "128x128", "144x112", "192x80")
    per_bin = {0.01: (2, 2, 2, 2), 0.1: (12, 12, 12, 13), 1.0: (122, 122, 122, 123)}
    monkeypatch.setattr("shards.loader_data.load_split", lambda root, split, label_fraction: SimpleNamespace(
        counts=dict(zip(bins, per_bin[label_fraction], strict=True))))  # fmt: skip
    protocol = demo.DemoSize().protocol()
    for name in ("vit", "cnn"):
        stages.stage_grid(
            tmp_path, tmp_path / "shards", stages.TrainedModel(name, "train.supervised"), protocol, "t"
        )
    runs = {(c["run_dir"], c["run.seed"]) for c in calls}
    assert len(runs) == 2 * 3 * 2  # (model, fraction) × 2 seeds
    epochs = {(c["run_dir"].split("/runs/")[1].split("/")[0], c["loader.label_fraction"], c["run.seed"]):
              int(c["run.epochs"]) for c in calls}  # fmt: skip
    assert epochs[("vit", "1.0", "0")] == 12 and epochs[("cnn", "1.0", "0")] == 3  # the protocol's epochs
    assert epochs[("vit", "0.01", "0")] == 25  # 100 steps at 4 an epoch
    assert epochs[("cnn", "0.01", "0")] == epochs[("cnn", "0.1", "1")] == 20  # 80 steps, 4 an epoch


def test_optimizer_steps_per_epoch_is_the_loaders_length(tiny_shards: Path, tmp_path: Path) -> None:
    """The count behind the minimum steps is the real loader's: bins, padding, token budget, accumulation; the
    recipe is loaded as the stage loads it (a key the stage does not know is refused, not ignored)."""
    from core.config import ConfigError
    from radstream.stages import TrainedModel, optimizer_steps_per_epoch
    from shards.loader import build_loader
    from shards.loader_config import LoaderConfig

    cnn = TrainedModel("cnn", "train.supervised")
    for batch, accumulation, budget in ((4, 1, None), (3, 2, None), (8, 1, 40)):
        recipe = tmp_path / f"r{batch}.yaml"
        recipe.write_text(f"loader:\n  batch_size: {batch}\n  token_budget: {'null' if budget is None else budget}\n"
                          f"optim:\n  grad_accum_steps: {accumulation}\n")  # fmt: skip
        cfg = LoaderConfig(backend="torch", batch_size=batch, token_budget=budget, num_workers=0)
        for world in (1, 2):
            loader = build_loader(cfg, tiny_shards, "train", train=True, num_processes=world, process_index=0)
            steps = optimizer_steps_per_epoch(tiny_shards, cnn, recipe, None, world)
            assert steps == max(1, len(loader) // accumulation)
    recipe.write_text("optim:\n  grad_accum: 2\n")  # a misspelt key
    with pytest.raises(ConfigError, match="grad_accum"):
        optimizer_steps_per_epoch(tiny_shards, cnn, recipe, 1.0, 1)
