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
    rows, section = {}, ""
    for line in (out / "results" / "results.md").read_text().splitlines():
        section = line if line.startswith("## ") else section
        cells = [c.strip() for c in line.strip("|").split("|")]
        if line.startswith("| ") and cells[0] not in ("Model", "---") and "MAE pretraining" not in section:
            rows.setdefault(cells[0], []).append(float(cells[1].split("±")[0]))
    # the flattened rows name their token grid, e.g. "MAE probe (flattened (resampled to 4×4))"
    flat = {name for name in rows if name.startswith(("MAE probe (flattened (", "MAE kNN (flattened ("))}
    assert len(flat) == 2 and all(name.endswith("))") for name in flat)
    assert set(rows) - flat == {
        "CNN baseline (resnet10t)",
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


@pytest.mark.parametrize("name", ["demo", "small", "full", "tiny"])
def test_every_protocol_gives_every_trained_model_the_one_minimum(
    name: str, tmp_path: Path, monkeypatch
) -> None:
    """One minimum-steps rule in every protocol (the full study's included): every supervised, fine-tuning
    and probe run gets the protocol's ``min_steps`` (the trainer raises the epochs and holds early stopping
    off until them); the MAE, which sees every image, does not."""
    import radstream.demo as demo
    import radstream.workflow as stages
    from radstream.study import PROTOCOLS

    protocol = demo.DemoSize().protocol() if name == "demo" else PROTOCOLS[name]
    assert protocol.min_steps > 0
    calls = []
    monkeypatch.setattr(stages, "run_stage", lambda stage, args, log, prefix, env=None: calls.append(
        (stage, dict(a.split("=", 1) for a in args if "=" in a))))  # fmt: skip
    for model in ("vit", "cnn", "finetune"):
        stages.stage_grid(tmp_path, tmp_path / "shards", stages.TrainedModel(model, "train.x"), protocol, "t")
    stages.stage_probe(tmp_path, tmp_path / "shards", tmp_path / "mae", protocol, "t")
    trained = [args for stage, args in calls if stage == "train.x"]
    assert len(trained) == 3 * len(protocol.fractions) * len(protocol.lrs or [1]) * protocol.train_seeds
    assert all(int(args["run.min_steps"]) == protocol.min_steps for args in trained)
    assert all(int(args["run.val_every_steps"]) == protocol.min_steps // 5 for args in trained)
    probe = next(args for stage, args in calls if stage == "radstream.eval.probe")
    assert int(probe["min_steps"]) == protocol.min_steps
    assert "run.min_steps" not in " ".join(protocol.overrides("pretrain"))


def test_the_report_stage_prints_the_mae_table(tmp_path: Path, monkeypatch) -> None:
    """results.md of `radstream demo` / `study` holds the MAE pretraining table: the report gets the MAE run."""
    import radstream.report.export
    import radstream.workflow as stages
    from tests.report.test_report import write_mae_run

    write_mae_run(tmp_path / "runs" / "mae", 1e-3, 0.02, 0.004)
    (tmp_path / "pictures").mkdir()
    monkeypatch.setattr(radstream.report.export, "export", lambda *a, **k: None)
    tables = stages.stage_report(tmp_path, [], tmp_path / "runs" / "mae")
    assert "## MAE pretraining" in tables and "| mae | 0.001 |" in tables


def test_the_demo_fixes_its_threads_and_deterministic_algorithms(tmp_path: Path, monkeypatch) -> None:
    """Every stage process of the demo runs 2 CPU threads (its tables do not depend on the machine's core
    count) and every trained model with torch's deterministic algorithms."""
    import subprocess

    import radstream.demo as demo
    import radstream.workflow as stages

    protocol = demo.DemoSize().protocol()
    assert protocol.env()["OMP_NUM_THREADS"] == protocol.env()["MKL_NUM_THREADS"] == "2"
    assert "run.deterministic=true" in protocol.overrides("vit")
    seen = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, stdout, stderr, env: seen.append(env) or 0)
    stages.run_stage("radstream.eval.probe", [], tmp_path / "x.log", "t", env=protocol.env())
    assert seen[0]["OMP_NUM_THREADS"] == "2"
